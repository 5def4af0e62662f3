"""The pieces every layout rule shares: :class:`Layout`, the kinds a rule returns, the transforms a
recognised architecture lays its tokens out with, and paths through a model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from captum_normgrad._core.layouts.grid import ArchitectureGrid
from captum_normgrad.reshape import TokensToGrid

__all__ = [
    "FIRST",
    "LAST",
    "ArchitectureGrid",
    "Kind",
    "Layout",
    "Refusal",
    "ReshapeTransform",
    "follow_permutes",
    "inside_attention",
    "is_torchvision",
    "path_to",
]

ReshapeTransform = Callable[[Tensor], Tensor]

FIRST, LAST = "channels first", "channels last"


@dataclass(frozen=True)
class Refusal:
    """A layer whose activation has no layout to lay out (or none that can be known): refused when
    its activation has more than one axis that could be the channels, with ``reason`` and ``fix``."""

    reason: str
    fix: str = ""


Kind = object  # FIRST, LAST, a Refusal, or a reshape transform


@dataclass(frozen=True)
class Layout:
    """How one layer's activation becomes ``(N, C, *S)``.

    Attributes:
        name: the layer's name, for messages.
        transform: the reshape transform, or ``None`` when channels are at dim 1.
        refusal: why the layout is not known (refused when the activation has 3 or more dims), or
            ``None``.
        input_side: the layout of the layer's *input* where it differs from its output's (a
            ``Permute``, Swin's patch embedding): used with ``attribute_to_layer_input=True``.
    """

    name: str
    transform: ReshapeTransform | None = None
    refusal: Refusal | None = None
    input_side: Layout | None = None

    @property
    def channels_first_for_sure(self) -> bool:
        """No transform and nothing that could refuse: the activation is taken as it is."""
        return self.transform is None and self.refusal is None

    def frozen(self) -> Layout:
        """This layout with the patch grid recorded for the current call fixed (see :mod:`.grid`):
        for a gradient laid out after the model may have run again (the training monitor)."""
        transform = self.transform
        if isinstance(transform, ArchitectureGrid):
            transform = transform.frozen()
        input_side = None if self.input_side is None else self.input_side.frozen()
        return Layout(self.name, transform, self.refusal, input_side)

    def side(self, at_input: bool) -> Layout:
        """The layout of the layer's input (``at_input``) or output."""
        return self.input_side if at_input and self.input_side is not None else self

    def channels_first(self, tensor: Tensor) -> Tensor:
        """The tensor as ``(N, C, *S)``, or a ``ValueError`` when its layout cannot be known."""
        if self.transform is not None:
            moved = self.transform(tensor)
            if not isinstance(moved, Tensor) or moved.shape[0] != tensor.shape[0]:
                raise ValueError(
                    f"the reshape_transform of layer '{self.name}' turned shape "
                    f"{tuple(tensor.shape)} into "
                    f"{tuple(moved.shape) if isinstance(moved, Tensor) else type(moved).__name__}; "
                    "it must return a tensor (N, C, *S) with the same batch N"
                )
            return moved
        if self.refusal is not None and tensor.dim() >= 3:
            raise ValueError(self._refusal(tensor))
        return tensor

    def _refusal(self, tensor: Tensor) -> str:
        shape = tuple(tensor.shape)
        if self.refusal.fix:
            fix = f"{self.refusal.fix}, or pass a reshape_transform"
        elif tensor.dim() == 3:
            fix = (
                "For ViT tokens (N, T, C) pass reshape_transform=TokensToGrid(num_prefix_tokens=1) "
                "(the class token; 0 without one, 2 for DeiT, 5 with 4 registers; grid_size=(h, w) "
                "for a non-square grid); a sequence-first (T, N, C) layer (batch_first=False) "
                "needs a transform that also moves the batch first (from captum_normgrad)"
            )
        else:
            fix = (
                "For channels-last (N, H, W, C) pass reshape_transform=channels_last_to_first "
                "(from captum_normgrad)"
            )
        return (
            f"layer '{self.name}' has an activation of shape {shape} whose layout is not known: "
            f"{self.refusal.reason}. NormGrad's norms run over dim 1 and could run over the wrong "
            f"axis. {fix}. If the channels really are at dim 1, pass "
            "reshape_transform=lambda x: x"
        )

    def check_patches_reach_loss(self, gradient: Tensor) -> None:
        """Refuse a token map whose patch tokens got no gradient while the prefix tokens did.

        In a ViT whose head reads only the class token, the last block's patch tokens (after its
        attention) never reach the loss: the map there is exactly zero. True, but useless, and easy
        to mistake for a bug or a result; refused with the layer to use instead.
        """
        if not isinstance(self.transform, TokensToGrid) or gradient.dim() != 3:
            return
        prefix = self.transform.num_prefix_tokens
        if prefix <= 0 or gradient.shape[1] <= prefix:
            return
        patches_dead = (gradient[:, prefix:] == 0).flatten(1).all(dim=1)
        prefix_alive = (gradient[:, :prefix] != 0).flatten(1).any(dim=1)
        if bool((patches_dead & prefix_alive).any()):
            raise RuntimeError(
                f"at layer '{self.name}' the loss has no gradient at any patch token, only at the "
                f"{prefix} prefix token(s): the head reads only the class token, so after the last "
                "block's attention the patch tokens never reach the loss and every map there is "
                "zero. Attribute at the last block's first LayerNorm (torchvision: "
                "model.encoder.layers[-1].ln_1, pytorch-grad-cam's choice; timm: "
                "model.blocks[-1].norm1) or an earlier block"
            )


def is_torchvision(module: nn.Module, class_name: str) -> bool:
    """Whether ``module`` is torchvision's model class ``class_name`` (not a namesake, e.g. timm's)."""
    kind = type(module)
    return kind.__name__ == class_name and kind.__module__.startswith("torchvision.models")


def permute_kind(module: nn.Module, kind: Kind) -> Kind:
    """The layout after a torchvision ``Permute`` (by its dims), else ``kind`` unchanged."""
    dims = list(getattr(module, "dims", []))
    if type(module).__name__ == "Permute" and len(dims) >= 3:
        if dims[1] == len(dims) - 1 and dims[0] == 0:
            return FIRST  # (N, *S, C) -> (N, C, *S)
        if dims[-1] == 1 and dims[0] == 0:
            return LAST  # (N, C, *S) -> (N, *S, C)
    return kind


def _kind_after(module: nn.Module, kind: Kind) -> Kind:
    """The layout of ``module``'s output given its input's: only ``Permute`` changes it, seen
    through ``nn.Sequential`` containers."""
    if isinstance(module, nn.Sequential):
        for child in module:
            kind = _kind_after(child, kind)
        return kind
    return permute_kind(module, kind)


def path_to(root: nn.Module, layer: nn.Module) -> list[nn.Module] | None:
    """The modules from ``root`` down to ``layer`` (both included), or ``None``."""
    for name, module in root.named_modules():
        if module is layer:
            path = [root]
            for part in name.split(".") if name else []:
                path.append(path[-1]._modules[part])
            return path
    return None


def follow_permutes(path: list[nn.Module], kind: Kind) -> tuple[Kind, Kind]:
    """The layouts of ``path[-1]``'s input and output, following the ``Permute`` modules met in
    ``nn.Sequential`` containers on the way down from the model (``kind``: the model's input)."""
    if not path:
        return kind, kind
    for parent, child in zip(path, path[1:]):
        if isinstance(parent, nn.Sequential):
            for sibling in parent:
                if sibling is child:
                    break
                kind = _kind_after(sibling, kind)
    return kind, _kind_after(path[-1], kind)


TOKEN_PARTS_OF_ATTENTION = (
    "qkv",
    "q",
    "k",
    "v",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "proj",
    "proj_drop",
    "output",
)


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next((name for name, module in parent.named_children() if module is child), "")


def inside_attention(
    below: list[nn.Module], attention_names: tuple[str, ...], windowed: bool = False
) -> Refusal | None:
    """A refusal for a layer in an attention whose tensors are per head (every part but the token
    projections) or, ``windowed``, per window (all of it), else ``None``."""
    for index in range(1, len(below)):
        if _child_name(below[index - 1], below[index]) not in attention_names:
            continue
        part = "" if index == len(below) - 1 else _child_name(below[index], below[index + 1])
        if windowed or (part and part not in TOKEN_PARTS_OF_ATTENTION):
            where = "per window (the windows in the batch)" if windowed else "per head"
            return Refusal(
                f"it is {f'{part!r} in ' if part else ''}an attention whose tensors are {where}",
                "Attribute at the block, its norms or its MLP",
            )
    return None
