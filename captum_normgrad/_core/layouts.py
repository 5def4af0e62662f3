"""Which axis holds the channels at a layer: chosen from the model, given by the user, or refused.

NormGrad's norms run over dim 1. That is right for CNNs and wrong for the token ``(N, T, C)`` and
channels-last ``(N, H, W, C)`` layouts of transformers, where a norm over dim 1 returns a plausible
looking map over the wrong axis. Each attributed layer therefore gets a :class:`Layout`:

- a ``reshape_transform`` the user gave (trusted as given);
- else one read from a recognised torchvision model, from module types alone (at construction):
  ``VisionTransformer`` (its encoder: tokens, class token dropped, grid ``image_size / patch_size``),
  ``SwinTransformer`` (``features`` and ``norm``: channels last) and ``ConvNeXt`` (channels last
  inside a ``CNBlock`` between its two ``Permute`` modules); ``Permute`` modules in ``nn.Sequential``
  containers are followed wherever they are;
- else channels at dim 1, checked at call time, when the shape is known: a layer that is itself a
  token module (``nn.Linear`` or ``nn.LayerNorm`` over the last dim, ``nn.MultiheadAttention``,
  ``nn.Transformer*``) on an activation of 3 or more dims, or whose last dim matches a feature size
  of the surrounding ``Linear`` / ``LayerNorm`` / attention modules while dim 1 does not, is refused
  with the layer's name, its shape and the transform to pass. A Conv1d's ``(N, C, L)`` passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from captum_normgrad._core.capture import layer_name
from captum_normgrad._core.model_state import models_behind
from captum_normgrad.reshape import TokensToGrid, channels_last_to_first

__all__ = ["Layout", "ReshapeTransform", "is_torchvision", "resolve_layouts"]

ReshapeTransform = Callable[[Tensor], Tensor]

_FIRST, _LAST = "channels first", "channels last"
_TOKEN_MODULES = (
    nn.Linear,
    nn.LayerNorm,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoderLayer,
    nn.TransformerDecoder,
    nn.Transformer,
)

_CHANNELS_FIRST_MODULES = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


@dataclass(frozen=True)
class Layout:
    """How one layer's activation becomes ``(N, C, *S)``.

    Attributes:
        name: the layer's name, for messages.
        transform: the reshape transform, or ``None`` when channels are already at dim 1.
        checked: ``False`` when "channels at dim 1" is an assumption to check against the shape.
        token_module: the layer is itself a module acting on the last dim (always refused unchecked).
        feature_sizes: the feature sizes of the token modules in and around the layer.
        input_side: the layout of the layer's *input* where it differs from its output's (a
            ``Permute``, Swin's patch embedding): used with ``attribute_to_layer_input=True``.
    """

    name: str
    transform: ReshapeTransform | None = None
    checked: bool = True
    token_module: bool = False
    feature_sizes: frozenset[int] = field(default_factory=frozenset)
    input_side: Layout | None = None

    @property
    def channels_first_for_sure(self) -> bool:
        """No transform, and nothing around the layer that could put its channels last."""
        return self.transform is None and (
            self.checked or not (self.token_module or self.feature_sizes)
        )

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
        if not self.checked and tensor.dim() >= 3 and self._channels_look_last(tensor):
            raise ValueError(self._refusal(tensor))
        return tensor

    def _channels_look_last(self, tensor: Tensor) -> bool:
        if self.token_module:
            return True
        return tensor.shape[-1] in self.feature_sizes and tensor.shape[1] not in self.feature_sizes

    def _refusal(self, tensor: Tensor) -> str:
        shape = tuple(tensor.shape)
        if tensor.dim() == 3:
            fix = (
                "For ViT tokens (N, T, C) pass reshape_transform=TokensToGrid(num_prefix_tokens=1) "
                "(the class token; 0 without one, 2 for DeiT, 5 with 4 registers; grid_size=(h, w) "
                "for a non-square grid); a sequence-first (T, N, C) layer (batch_first=False) "
                "needs a transform that also moves the batch first"
            )
        else:
            fix = "For channels-last (N, H, W, C) pass reshape_transform=channels_last_to_first"
        return (
            f"layer '{self.name}' has an activation of shape {shape} whose channels look last "
            "(it is or sits among modules acting on the last dim); NormGrad's norms run over "
            f"dim 1 and would return a map over the wrong axis. {fix} (both from "
            "captum_normgrad). If the channels really are at dim 1, pass "
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
                "model.encoder.layers[-1].ln_1, pytorch-grad-cam's choice) or an earlier block"
            )


def is_torchvision(module: nn.Module, class_name: str) -> bool:
    """Whether ``module`` is torchvision's model class ``class_name`` (not a namesake, e.g. timm's)."""
    kind = type(module)
    return kind.__name__ == class_name and kind.__module__.startswith("torchvision.models")


def _permute_layout(module: nn.Module, layout: str) -> str:
    dims = list(getattr(module, "dims", []))
    if type(module).__name__ == "Permute" and len(dims) >= 3:
        if dims[1] == len(dims) - 1 and dims[0] == 0:
            return _FIRST  # (N, *S, C) -> (N, C, *S)
        if dims[-1] == 1 and dims[0] == 0:
            return _LAST  # (N, C, *S) -> (N, *S, C)
    return layout


def _layout_after(module: nn.Module, layout: str) -> str:
    """The layout of ``module``'s output given its input's: only ``Permute`` changes it, seen
    through ``nn.Sequential`` containers."""
    if isinstance(module, nn.Sequential):
        for child in module:
            layout = _layout_after(child, layout)
        return layout
    return _permute_layout(module, layout)


def _path_to(root: nn.Module, layer: nn.Module) -> list[nn.Module] | None:
    """The modules from ``root`` down to ``layer`` (both included), or ``None``."""
    for name, module in root.named_modules():
        if module is layer:
            path = [root]
            for part in name.split(".") if name else []:
                path.append(path[-1]._modules[part])
            return path
    return None


def _known_layout(path: list[nn.Module]) -> tuple[object, object] | None:
    """The layouts of the input and the output of ``path[-1]`` in a recognised torchvision model
    (``_FIRST``, ``_LAST`` or a transform), else ``None``."""
    for index in range(len(path) - 1, -1, -1):
        model = path[index]
        below = path[index + 1 :]
        if is_torchvision(model, "VisionTransformer"):
            if below and below[0] is model.encoder:
                side = model.image_size // model.patch_size
                tokens = TokensToGrid(num_prefix_tokens=1, grid_size=(side, side))
                return tokens, tokens
            return _FIRST, _FIRST
        if is_torchvision(model, "SwinTransformer"):
            # features turn the image channels last; the final norm and permute come after them.
            after_features = below and any(below[0] is m for m in (model.norm, model.permute))
            return _follow_permutes(below, _LAST if after_features else _FIRST)
        if is_torchvision(model, "ConvNeXt"):
            return _follow_permutes(below, _FIRST)
    return None


def _follow_permutes(path: list[nn.Module], layout: str) -> tuple[str, str]:
    """The layouts of ``path[-1]``'s input and output, following the ``Permute`` modules met in
    ``nn.Sequential`` containers on the way down from the model (``layout``: the model's input)."""
    if not path:
        return layout, layout
    for parent, child in zip(path, path[1:]):
        if isinstance(parent, nn.Sequential):
            for sibling in parent:
                if sibling is child:
                    break
                layout = _layout_after(sibling, layout)
    return layout, _layout_after(path[-1], layout)


def _feature_sizes(scope: nn.Module) -> frozenset[int]:
    """The feature sizes of the last-dim modules in ``scope``; none when ``scope`` holds a module
    that is channels first by definition (a convolution, a batch or group norm): a CNN block's
    ``nn.Linear`` (squeeze-excitation, a head) says nothing about its activations' layout."""
    sizes = set()
    for module in scope.modules():
        if isinstance(module, _CHANNELS_FIRST_MODULES):
            return frozenset()
        if isinstance(module, nn.Linear):
            sizes.update((module.in_features, module.out_features))
        elif isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            sizes.add(module.normalized_shape[0])
        elif isinstance(module, nn.MultiheadAttention):
            sizes.add(module.embed_dim)
    return frozenset(sizes)


def _transform_of(kind: object) -> ReshapeTransform | None:
    if kind == _FIRST:
        return None
    return channels_last_to_first if kind == _LAST else kind


def _auto_layout(root: nn.Module | None, layer: nn.Module, name: str) -> Layout:
    path = _path_to(root, layer) if root is not None else None
    known = _known_layout(path) if path else None
    if known is not None:
        input_kind, output_kind = known
        input_side = None if input_kind is output_kind else Layout(name, _transform_of(input_kind))
        return Layout(name, _transform_of(output_kind), input_side=input_side)
    is_token_module = isinstance(layer, _TOKEN_MODULES) and not (
        isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) != 1
    )
    # A leaf (GELU, Dropout) is judged by its siblings, a container by what it holds.
    around = path[-2] if path is not None and len(path) >= 2 and not layer._modules else layer
    return Layout(
        name, checked=False, token_module=is_token_module, feature_sizes=_feature_sizes(around)
    )


def resolve_layouts(
    forward_func: object,
    layers: Sequence[nn.Module],
    reshape_transform: ReshapeTransform | Sequence[ReshapeTransform | None] | None,
) -> list[Layout]:
    """One :class:`Layout` per layer, from the user's transform(s) or the model.

    Args:
        forward_func: the model (or a bound method of it), searched for recognised architectures.
        layers: the attributed modules.
        reshape_transform: ``None`` (choose from the model), one callable for every layer, or a list
            with one entry per layer (``None`` entries chosen from the model).

    Raises:
        TypeError: a transform that is not callable.
        ValueError: a list of transforms whose length is not the number of layers.
    """
    if reshape_transform is None or callable(reshape_transform):
        transforms = [reshape_transform] * len(layers)
    elif isinstance(reshape_transform, (list, tuple)):
        transforms = list(reshape_transform)
        if len(transforms) != len(layers):
            raise ValueError(
                f"reshape_transform lists {len(transforms)} transforms for {len(layers)} layers; "
                "give one per layer (None where the model's layout should be used) or one for all"
            )
    else:
        raise TypeError(
            "reshape_transform must be a callable (N, ...) -> (N, C, *S), a list of them, or "
            f"None; got {type(reshape_transform).__name__}"
        )
    owners = models_behind(forward_func, [])
    root = owners[0] if owners else None
    layouts = []
    for layer, transform in zip(layers, transforms):
        name = layer_name(forward_func if root is None else root, layer)
        if isinstance(layer, nn.MultiheadAttention):
            raise TypeError(
                f"layer '{name}' is an nn.MultiheadAttention: it takes query, key and value and "
                "returns a tuple (attn_output, attn_weights), so it has no single activation to "
                "attribute. Attribute at the module that produces its input (torchvision ViT: "
                "encoder.layers[k].ln_1) or at the enclosing block, with "
                "reshape_transform=TokensToGrid(num_prefix_tokens=...) outside torchvision ViTs"
            )
        if transform is None:
            layouts.append(_auto_layout(root, layer, name))
        elif callable(transform):
            layouts.append(Layout(name, transform))
        else:
            raise TypeError(
                f"the reshape_transform for layer '{name}' is a {type(transform).__name__}, "
                "not a callable"
            )
    return layouts
