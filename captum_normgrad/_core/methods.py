"""Calling an attribution method the metrics did not write: anything Captum-shaped.

A *method* is any object with ``attribute(inputs, target=..., **kwargs)`` (NormGrad's classes,
``captum.attr.LayerGradCam``, ``IntegratedGradients`` ...) or a plain callable
``f(inputs, target=..., **kwargs)``. It returns one ``(N, 1, h, w)`` map, or a list of them (one per
layer, as ``LayerNormGrad`` given a list of layers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from captum_normgrad._core.capture import layer_name

__all__ = [
    "AttributionMethod",
    "Method",
    "call_method",
    "declared_layers",
    "method_layer_names",
]


@runtime_checkable
class AttributionMethod(Protocol):
    """What the metrics need from a Captum-style method."""

    def attribute(self, inputs: Tensor, target: Any = None, **kwargs: Any) -> Any: ...


Method = AttributionMethod | Callable[..., Tensor | list[Tensor]]


def call_method(
    method: Method, inputs: Tensor, target: Any, kwargs: Mapping[str, Any] | None = None
) -> list[Tensor]:
    """The method's maps for ``inputs``, always as a list (one entry per layer)."""
    kwargs = dict(kwargs or {})
    if isinstance(method, AttributionMethod):
        result = method.attribute(inputs, target=target, **kwargs)
    elif callable(method):
        result = method(inputs, target=target, **kwargs)
    else:
        raise TypeError(
            f"a method must have .attribute(inputs, target=...) or be callable, got {method!r}"
        )
    maps = list(result) if isinstance(result, (list, tuple)) else [result]
    for index, layer_map in enumerate(maps):
        if not isinstance(layer_map, Tensor):
            raise TypeError(f"the method returned a {type(layer_map).__name__} at position {index}")
    return [layer_map.detach() for layer_map in maps]


def declared_layers(method: Method) -> list[nn.Module] | None:
    """The layers a method says it explains (``.layers`` or ``.layer``), or ``None``."""
    owner = getattr(method, "func", method)  # a functools.partial
    owner = getattr(owner, "__self__", owner)  # a bound .attribute
    layers = getattr(owner, "layers", None)
    if layers is None:
        layer = getattr(owner, "layer", None)
        layers = [layer] if isinstance(layer, nn.Module) else layer
    if not isinstance(layers, (list, tuple)) or not all(isinstance(m, nn.Module) for m in layers):
        return None
    return list(layers)


def method_layer_names(method: Method, model: nn.Module | None, count: int) -> list[str]:
    """Names for the ``count`` maps a method returns: its layers' names in ``model`` when known."""
    layers = declared_layers(method)
    if layers is not None and len(layers) == count:
        return [layer_name(model, layer) for layer in layers]
    return ["-"] if count == 1 else [f"map {index}" for index in range(count)]
