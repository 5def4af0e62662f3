"""The attribution methods the command line offers, each a thin wrapper over the public API.

:func:`build_method` returns a Captum-style object: ``.attribute(inputs, target=...)`` gives one
``(N, 1, h, w)`` map per layer, and ``.layers`` names the layers (what
:func:`captum_normgrad.metrics.evaluate_attributions` reads to label its rows). NormGrad methods get
all layers from one call (one set of passes: one forward and one backward for order 0, four per
example for order 1); ``LayerGradCam`` takes one layer per call. NormGrad backpropagates the
training loss (cross-entropy of the target); Grad-CAM the target's score, as Captum defines it, with
its ReLU. On a transformer layer (tokens, channels last) Captum's Grad-CAM would average over the
wrong axis, so there Grad-CAM is computed by its definition on the layer's layout, the same one
NormGrad uses (:mod:`captum_normgrad._layouts`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import LayerGradCam
from torch import Tensor, nn

from captum_normgrad._layouts import Layout, resolve_layouts
from captum_normgrad.cli._errors import CliError
from captum_normgrad.normgrad import LayerNormGrad, LayerNormGradSelective
from captum_normgrad.normgrad_conv import LayerNormGradConv
from captum_normgrad.order1 import LayerNormGradAdversarial, LayerNormGradOrder1

__all__ = ["METHODS", "LayerGradCams", "MethodInfo", "attribute_or_fail", "build_method"]


def grad_cam_on_layout(
    model: nn.Module, layer: nn.Module, layout: Layout, inputs: Tensor, target: Tensor
) -> Tensor:
    """Grad-CAM by its definition, ``ReLU(sum_c mean_u(d score / d x_c) x_c)``, with ``x`` and its
    gradient laid out channels first by ``layout`` (which refuses a layout it cannot know)."""
    captured = {}

    def keep_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        captured["output"] = output
        return output.clone()  # what was kept cannot be changed by an in-place op downstream

    handle = layer.register_forward_hook(keep_output)
    try:
        with torch.enable_grad():
            score = model(inputs).gather(1, torch.as_tensor(target).reshape(-1, 1)).sum()
            (gradient,) = torch.autograd.grad(score, captured["output"])
    finally:
        handle.remove()
    layout.check_patches_reach_loss(gradient)
    activation = layout.channels_first(captured["output"].detach())
    gradient = layout.channels_first(gradient)
    weights = gradient.mean(dim=tuple(range(2, gradient.dim())), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1, keepdim=True))


class LayerGradCams:
    """Grad-CAM at several layers, one call each, with its ReLU applied: Captum's ``LayerGradCam``
    on channels-first layers, :func:`grad_cam_on_layout` where the layout is not channels first
    (or may not be: then it is checked against the activation's shape)."""

    def __init__(self, model: nn.Module, layers: list[nn.Module]) -> None:
        self.layers = list(layers)
        self._model = model
        self._layouts = resolve_layouts(model, self.layers, None)
        self._cams = [LayerGradCam(model, layer) for layer in self.layers]

    def attribute(self, inputs: Tensor, target: Any = None, **kwargs: Any) -> list[Tensor]:
        """One Grad-CAM map per layer, ``(N, 1, h, w)``, detached."""
        return [
            cam.attribute(inputs, target=target, relu_attributions=True, **kwargs).detach()
            if layout.channels_first_for_sure
            else grad_cam_on_layout(self._model, layer, layout, inputs, target).detach()
            for cam, layer, layout in zip(self._cams, self.layers, self._layouts)
        ]


@dataclass(frozen=True)
class MethodInfo:
    """One command-line method: its display label, its class, and a one-line description."""

    label: str
    attribution_class: type
    description: str


METHODS: dict[str, MethodInfo] = {
    "gradcam": MethodInfo(
        "Grad-CAM", LayerGradCams, "captum.attr.LayerGradCam, one call per layer"
    ),
    "normgrad": MethodInfo("NormGrad", LayerNormGrad, "order 0, ||x_u|| ||g_u||"),
    "order1": MethodInfo(
        "order 1", LayerNormGradOrder1, "after one inner SGD step (paper defaults eps=5e-4)"
    ),
    "adversarial": MethodInfo(
        "adversarial", LayerNormGradAdversarial, "what would most degrade the model (order 1, +eps)"
    ),
    "selective": MethodInfo("selective", LayerNormGradSelective, "||max(x_u g_u, 0)||"),
    "conv": MethodInfo(
        "NormGrad conv", LayerNormGradConv, "order 0 on a real conv (conv layers; map at its input)"
    ),
}
"""Every method by its command-line name."""


def build_method(name: str, model: nn.Module, layers: list[nn.Module]) -> Any:
    """An object whose ``.attribute(inputs, target=...)`` returns method ``name``'s map per layer."""
    return METHODS[name].attribution_class(model, list(layers))


def attribute_or_fail(
    method: str, model: nn.Module, layers: list[nn.Module], inputs: Tensor, targets: Tensor
) -> tuple[list[Tensor], float]:
    """A method's maps and the seconds they took; the library's own error becomes one line."""
    start = time.perf_counter()
    try:
        maps = build_method(method, model, layers).attribute(inputs, target=targets)
    except (ValueError, TypeError, RuntimeError) as error:
        raise CliError(f"method {method!r}: {error}") from error
    return [layer_map.detach() for layer_map in maps], time.perf_counter() - start
