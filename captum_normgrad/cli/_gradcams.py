"""Grad-CAM at several layers, shaped like a NormGrad method for the command line.

On a channels-first layer this is Captum's ``LayerGradCam``. On a transformer layer (tokens, channels
last) Captum's Grad-CAM would average over the wrong axis, so there Grad-CAM is computed by its
definition on the layer's layout, the same one NormGrad uses (:mod:`captum_normgrad._core.layouts`).
"""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import LayerGradCam
from torch import Tensor, nn

from captum_normgrad._core.capture import float_activation
from captum_normgrad._core.front_door import explained_output
from captum_normgrad._core.hidden_states import activation_in, with_activation
from captum_normgrad._core.layouts import Layout, recording_grids, resolve_layouts

__all__ = ["LayerGradCams", "grad_cam_on_layout"]


def grad_cam_on_layout(
    model: nn.Module, layer: nn.Module, layout: Layout, inputs: Tensor, target: Tensor
) -> Tensor:
    """Grad-CAM by its definition, ``ReLU(sum_c mean_u(d score / d x_c) x_c)``, with ``x`` and its
    gradient laid out channels first by ``layout`` (which refuses a layout it cannot know)."""
    captured = {}

    def keep_output(module: nn.Module, args: tuple, output: object) -> object:
        captured["output"] = float_activation(activation_in(module, output), layout.name)
        # what was kept cannot be changed by an in-place op downstream
        return with_activation(module, output, captured["output"].clone())

    with recording_grids([layout]):
        handle = layer.register_forward_hook(keep_output)
        try:
            with torch.enable_grad():
                logits = explained_output(model(inputs))
                score = logits.gather(1, torch.as_tensor(target).reshape(-1, 1)).sum()
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
        # Captum scores a tensor: a Hugging Face model's ModelOutput is read for its logits first.
        self._cams = [LayerGradCam(self._logits, layer) for layer in self.layers]

    def _logits(self, inputs: Tensor) -> Tensor:
        return explained_output(self._model(inputs))

    def attribute(self, inputs: Tensor, target: Any = None, **kwargs: Any) -> list[Tensor]:
        """One Grad-CAM map per layer, ``(N, 1, h, w)``, detached."""
        return [
            cam.attribute(inputs, target=target, relu_attributions=True, **kwargs).detach()
            if layout.channels_first_for_sure
            else grad_cam_on_layout(self._model, layer, layout, inputs, target).detach()
            for cam, layer, layout in zip(self._cams, self.layers, self._layouts)
        ]
