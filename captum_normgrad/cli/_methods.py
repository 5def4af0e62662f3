"""The attribution methods the command line offers, each a thin wrapper over the public API.

:func:`build_method` returns a Captum-style object: ``.attribute(inputs, target=...)`` gives one
``(N, 1, h, w)`` map per layer, and ``.layers`` names the layers (what
:func:`captum_normgrad.metrics.evaluate_attributions` reads to label its rows). NormGrad methods get
all layers from one call (one set of passes: one forward and one backward for order 0, four per
example for order 1); ``LayerGradCam`` takes one layer per call. NormGrad backpropagates the
training loss (cross-entropy of the target); Grad-CAM the target's score, as Captum defines it, with
its ReLU.

The table names each class by its import path, so building the parser (the choices and their help)
imports neither torch nor Captum.
"""

from __future__ import annotations

import importlib
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from captum_normgrad.cli._errors import CliError

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["METHODS", "MethodInfo", "attribute_or_fail", "build_method", "median_seconds"]


@dataclass(frozen=True)
class MethodInfo:
    """One command-line method: its display label, its class's import path, a one-line description."""

    label: str
    class_path: str
    description: str

    def attribution_class(self) -> type:
        """The class (``module:Name`` in :attr:`class_path`), imported now."""
        module, name = self.class_path.split(":")
        return getattr(importlib.import_module(module), name)


METHODS: dict[str, MethodInfo] = {
    "gradcam": MethodInfo(
        "Grad-CAM",
        "captum_normgrad.cli._gradcams:LayerGradCams",
        "captum.attr.LayerGradCam, one call per layer",
    ),
    "normgrad": MethodInfo(
        "NormGrad", "captum_normgrad.normgrad:LayerNormGrad", "order 0, ||x_u|| ||g_u||"
    ),
    "order1": MethodInfo(
        "order 1",
        "captum_normgrad.order1:LayerNormGradOrder1",
        "after one inner SGD step (paper defaults eps=5e-4)",
    ),
    "adversarial": MethodInfo(
        "adversarial",
        "captum_normgrad.order1:LayerNormGradAdversarial",
        "what would most degrade the model (order 1, +eps)",
    ),
    "selective": MethodInfo(
        "selective", "captum_normgrad.normgrad:LayerNormGradSelective", "||max(x_u g_u, 0)||"
    ),
    "conv": MethodInfo(
        "NormGrad conv",
        "captum_normgrad.normgrad_conv:LayerNormGradConv",
        "order 0 on a real conv (conv layers; map at its input)",
    ),
}
"""Every method by its command-line name."""


def build_method(name: str, model: nn.Module, layers: list[nn.Module]) -> Any:
    """An object whose ``.attribute(inputs, target=...)`` returns method ``name``'s map per layer."""
    return METHODS[name].attribution_class()(model, list(layers))


def attribute_or_fail(
    method: str, model: nn.Module, layers: list[nn.Module], inputs: Tensor, targets: Tensor
) -> list[Tensor]:
    """A method's maps, one per layer; the library's own error becomes one line."""
    try:
        maps = build_method(method, model, layers).attribute(inputs, target=targets)
    except (ValueError, TypeError, RuntimeError) as error:
        raise CliError(f"method {method!r}: {error}") from error
    return [layer_map.detach() for layer_map in maps]


def median_seconds(
    method: str,
    model: nn.Module,
    layers: list[nn.Module],
    inputs: Tensor,
    targets: Tensor,
    repeats: int,
) -> float:
    """The median wall time of ``repeats`` further calls, to be run after a first (warm-up) call.

    One cold call on a shared CPU can read 30 times its warm time (first-touch allocations,
    another process's burst); the median of warm calls is what a user who runs the method in a
    loop pays.
    """
    attribution = build_method(method, model, layers)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        attribution.attribute(inputs, target=targets)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)
