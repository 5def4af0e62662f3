"""Validation shared by the metrics: maps and images that fit together, or a clear error.

Every metric takes ``maps`` in Captum's layer-attribution shape ``(N, 1, h, w)`` (NormGrad,
``LayerGradCam``) at any resolution and first brings them to the image's ``(H, W)`` with the same
bilinear upsampling everywhere, so that a metric never compares a 7x7 map with a 224x224 image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from captum_normgrad.combine import upsample_maps

__all__ = ["check_images", "image_maps", "image_size_of"]


def check_images(inputs: object, name: str = "inputs") -> Tensor:
    """A batch of images ``(N, C, H, W)``, floating point and finite."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a tensor (N, C, H, W), got {type(inputs).__name__}")
    if inputs.dim() != 4:
        raise ValueError(f"{name} must be images (N, C, H, W), got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {inputs.dtype}")
    if not torch.isfinite(inputs).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return inputs


def image_size_of(size: Sequence[int] | torch.Size) -> tuple[int, int]:
    """A validated ``(H, W)`` pair of positive ints."""
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"image_size must be (H, W) with positive ints, got {size!r}")
    return size  # type: ignore[return-value]


def image_maps(maps: object, image_size: Sequence[int], batch_size: int | None = None) -> Tensor:
    """Validate ``(N, 1, h, w)`` maps and upsample them (bilinear) to ``image_size``.

    Args:
        maps: the attribution maps, one channel, any resolution.
        image_size: the ``(H, W)`` the metric works at.
        batch_size: when given, the number of examples the maps must have.

    Returns:
        ``(N, 1, H, W)`` maps in their own floating dtype.

    Raises:
        TypeError / ValueError: not a tensor, wrong shape, several channels, non-finite values, or
            a batch size that differs from the images'.
    """
    if isinstance(maps, (list, tuple)):
        raise TypeError(
            f"maps must be one (N, 1, h, w) tensor, got a {type(maps).__name__} of "
            f"{len(maps)}; a multi-layer method returns one map per layer: evaluate each layer's "
            "map on its own (or combine them with captum_normgrad.combine.combine_layer_maps)"
        )
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a tensor (N, 1, h, w), got {type(maps).__name__}")
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(
            f"maps must have shape (N, 1, h, w), got {tuple(maps.shape)}; reduce a per-channel "
            "input attribution first, e.g. attributions.sum(dim=1, keepdim=True)"
        )
    if batch_size is not None and maps.shape[0] != batch_size:
        raise ValueError(f"maps hold {maps.shape[0]} examples but the images hold {batch_size}")
    if not maps.is_floating_point():
        maps = maps.float()
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")
    return upsample_maps(maps.detach(), image_size_of(image_size))
