"""From a layer's activation and gradient to its map: the layout step, then the channel norms.

Every map of the package goes through :func:`laid_out` before its norms, so that no method (order 0,
order 1, the monitor, the differentiable maps of ``training/``) can take a norm over the wrong axis:
a token or channels-last activation is moved to ``(N, C, *S)`` by the layer's
:class:`~captum_normgrad._core.layouts.Layout`, or refused naming the layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captum_normgrad._core.layouts import Layout

__all__ = ["channel_norm", "check_finite_map", "laid_out"]


def channel_norm(tensor: Tensor) -> Tensor:
    """The Euclidean norm over channels (dim 1) at every location: ``(N, C, *S) -> (N, 1, *S)``.

    Scaled by the location's largest ``|x|`` first, so that activations near ``1e19`` (whose squares
    overflow float32) still give their finite norm. The scale is a constant for autograd:
    ``s * ||x / s||`` has the gradient of ``||x||`` for any fixed ``s``.
    """
    scale = tensor.detach().abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.linalg.vector_norm(tensor / scale, dim=1, keepdim=True) * scale


def laid_out(layout: Layout, activation: Tensor, gradient: Tensor) -> tuple[Tensor, Tensor]:
    """The activation and its gradient, channels first, by the same transform; refused where the
    layout cannot be known or (a ViT's last block) the patches never reach the loss."""
    layout.check_patches_reach_loss(gradient)
    return layout.channels_first(activation), layout.channels_first(gradient)


def check_finite_map(layer_map: Tensor, name: str) -> Tensor:
    """Inputs were finite, so a NaN or infinite map is an overflow: refuse it, never return it."""
    if not torch.isfinite(layer_map).all():
        raise RuntimeError(
            f"the map of layer '{name}' is not finite although the inputs are: its "
            f"activation or gradient overflows {layer_map.dtype}. Attribute in float64 "
            "(model.double() and double inputs), at a layer with smaller activations, or (order 1) "
            "with a smaller eps"
        )
    return layer_map
