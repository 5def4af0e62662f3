"""Bringing maps from several layers to the image and combining them.

Maps at different depths have different resolutions and scales (deeper activations are larger, their
gradients smaller). The authors combined them by upsampling each to the image, min-max normalising
each per example to ``[0, 1]``, and multiplying them (a location must matter at every depth) or taking
a weighted sum (it may matter at any depth).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from captum.attr import LayerAttribution
from torch import Tensor

__all__ = ["combine_layer_maps", "normalize_per_example", "upsample_maps"]

_INTERPOLATION_BY_DIMS = {1: "linear", 2: "bilinear", 3: "trilinear"}


def normalize_per_example(maps: Tensor) -> Tensor:
    """Min-max normalise each example's map to ``[0, 1]``.

    A constant map carries no ranking, so it becomes all zeros rather than a division by zero.

    Args:
        maps: ``(N, ...)`` maps.

    Returns:
        Maps of the same shape with each example's minimum at 0 and maximum at 1.
    """
    if maps.dim() < 2:
        raise ValueError(f"maps must be batched (N, ...), got shape {tuple(maps.shape)}")
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    normalised = torch.where(
        span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0
    )
    return normalised.view_as(maps)


def upsample_maps(maps: Tensor, size: Sequence[int] | int, mode: str | None = None) -> Tensor:
    """Upsample ``(N, 1, *S)`` maps to ``size`` with Captum's ``LayerAttribution.interpolate``.

    Args:
        maps: layer maps with one to three location dims.
        size: the target location dims, e.g. the image's ``(H, W)``.
        mode: interpolation mode; defaults to (bi/tri)linear for the number of location dims.

    Returns:
        The maps at ``size``.
    """
    location_dims = maps.dim() - 2
    if location_dims not in _INTERPOLATION_BY_DIMS:
        raise ValueError(
            f"maps must be (N, 1, *S) with 1 to 3 location dims, got shape {tuple(maps.shape)}"
        )
    size = (size,) * location_dims if isinstance(size, int) else tuple(size)
    if len(size) != location_dims:
        raise ValueError(f"size {size} does not match the maps' {location_dims} location dims")
    mode = mode or _INTERPOLATION_BY_DIMS[location_dims]
    if tuple(maps.shape[2:]) == size:
        return maps
    if mode in ("linear", "bilinear", "trilinear", "bicubic"):
        # align_corners=False, as torchvision resizes images; Captum's helper passes no flag.
        return torch.nn.functional.interpolate(maps, size, mode=mode, align_corners=False)
    return LayerAttribution.interpolate(maps, size, mode)


def combine_layer_maps(
    maps: Sequence[Tensor],
    size: Sequence[int] | int,
    how: Literal["product", "sum"] = "product",
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Combine maps from several layers into one map at ``size``.

    Each map is upsampled to ``size`` and min-max normalised per example, then

    - ``"product"``: multiplied together (a location must be salient at every depth);
    - ``"sum"``: summed with ``weights`` (default equal weights summing to 1), so the result stays in
      ``[0, 1]`` when the weights sum to 1.

    Args:
        maps: ``(N, 1, *S_i)`` maps, e.g. the list ``LayerNormGrad`` returns for a list of layers.
        size: the common location dims, usually the input image's ``(H, W)``.
        how: ``"product"`` or ``"sum"``.
        weights: one non-negative weight per map, for ``"sum"`` only.

    Returns:
        A ``(N, 1, *size)`` map.

    Example:
        >>> maps = LayerNormGrad(model, [model.layer2, model.layer3]).attribute(images, target=0)
        >>> combined = combine_layer_maps(maps, images.shape[-2:], how="product")
    """
    if len(maps) == 0:
        raise ValueError("combine_layer_maps needs at least one map")
    batch_sizes = {m.shape[0] for m in maps}
    if len(batch_sizes) != 1:
        raise ValueError(f"maps have different batch sizes {sorted(batch_sizes)}")
    normalised = [normalize_per_example(upsample_maps(m, size)) for m in maps]
    if how == "product":
        if weights is not None:
            raise ValueError("weights apply to how='sum' only")
        combined = normalised[0]
        for layer_map in normalised[1:]:
            combined = combined * layer_map
        return combined
    if how == "sum":
        if weights is None:
            weights = [1.0 / len(maps)] * len(maps)
        if len(weights) != len(maps):
            raise ValueError(f"{len(weights)} weights given for {len(maps)} maps")
        if any(w < 0 for w in weights):
            raise ValueError(f"weights must be non-negative, got {list(weights)}")
        return sum(w * m for w, m in zip(weights, normalised))
    raise ValueError(f"how must be 'product' or 'sum', got {how!r}")
