"""Which axis holds the channels at a layer: read from the architecture, given by the user, or
refused; never guessed from sizes (STYLE.md rule 14).

NormGrad's norms run over dim 1. That is right for CNNs and wrong for the token ``(N, T, C)`` and
channels-last ``(N, H, W, C)`` layouts of transformers, where a norm over dim 1 returns a plausible
looking map over the wrong axis. Each attributed layer therefore gets a
:class:`~captum_normgrad._core.layouts.base.Layout`:

- a ``reshape_transform`` the user gave (trusted as given);
- else one read from a recognised model: an explicit map from model class (by its qualified name,
  looked up along the class's MRO, so subclasses are recognised) to a rule that reads the model's
  own attributes (:mod:`.torchvision`, :mod:`.timm`, :mod:`.huggingface`), for the innermost
  recognised model on the path to the layer;
  (the patch grid a token layout needs is read from the call itself, :mod:`.grid`: every method
  runs inside :func:`recording_grids`);
- else from the module that produced the activation (:mod:`.generic`): channels first for a
  convolution's, refused (with the transform to pass) for a token or channels-last module's or
  where nothing decides and the activation has more than one axis that could be the channels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from captum_normgrad._core.by_class import registered
from captum_normgrad._core.capture import layer_name
from captum_normgrad._core.layouts import huggingface, timm, torchvision
from captum_normgrad._core.layouts.base import (
    FIRST,
    LAST,
    Kind,
    Layout,
    Refusal,
    ReshapeTransform,
    is_torchvision,
    path_to,
)
from captum_normgrad._core.layouts.generic import generic_kinds
from captum_normgrad._core.layouts.grid import recording_grids
from captum_normgrad._core.model_state import models_behind
from captum_normgrad.reshape import channels_last_to_first

__all__ = [
    "REGISTRY",
    "Layout",
    "ReshapeTransform",
    "is_torchvision",
    "recording_grids",
    "resolve_layouts",
]

Rule = Callable[[nn.Module, list[nn.Module]], tuple[Kind, Kind]]

#: Model class (``module.QualifiedName``) -> the rule laying out any layer inside it.
REGISTRY: dict[str, Rule] = {**torchvision.REGISTRY, **timm.REGISTRY, **huggingface.REGISTRY}


def _known_kinds(path: list[nn.Module]) -> tuple[Kind, Kind] | None:
    """The layouts of ``path[-1]``'s input and output from the innermost recognised model."""
    for index in range(len(path) - 1, -1, -1):
        rule = registered(REGISTRY, path[index])
        if rule is not None:
            return rule(path[index], path[index + 1 :])
    return None


def _layout(name: str, kind: Kind) -> Layout:
    if kind == FIRST:
        return Layout(name)
    if kind == LAST:
        return Layout(name, channels_last_to_first)
    if isinstance(kind, Refusal):
        return Layout(name, refusal=kind)
    return Layout(name, kind)


def _auto_layout(root: nn.Module | None, layer: nn.Module, name: str) -> Layout:
    path = path_to(root, layer) if root is not None else None
    kinds = _known_kinds(path) if path else None
    input_kind, output_kind = kinds if kinds is not None else generic_kinds(path, layer)
    output = _layout(name, output_kind)
    if input_kind is output_kind:
        return output
    return Layout(name, output.transform, output.refusal, input_side=_layout(name, input_kind))


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
