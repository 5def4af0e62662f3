"""How alike two maps of the same examples are: Spearman rank correlation and SSIM, per example.

Used by the model-randomisation sanity check (a map that stays alike after the weights are
randomised does not explain the model) and by class selectivity (a map that stays alike when the
target changes does not explain the class).

A constant map has no ranking: its rank correlation with anything is reported as 0 (no agreement)
rather than NaN.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import Tensor

from captum_normgrad.combine import normalize_per_example

__all__ = ["class_selectivity", "contrast_classes", "map_ssim", "spearman_correlation"]


def _paired(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    for name, maps in (("first", first), ("second", second)):
        if not isinstance(maps, Tensor):
            raise TypeError(f"the {name} maps must be a tensor, got {type(maps).__name__}")
        if maps.dim() < 2:
            raise ValueError(f"maps must be batched (N, ...), got shape {tuple(maps.shape)}")
        if not torch.isfinite(maps).all():
            raise ValueError(f"the {name} maps contain NaN or infinite values")
    if first.shape != second.shape:
        raise ValueError(
            f"maps of shapes {tuple(first.shape)} and {tuple(second.shape)} cannot be compared; "
            "bring them to one resolution first (captum_normgrad.combine.upsample_maps)"
        )
    dtype = torch.promote_types(first.dtype, second.dtype)
    dtype = dtype if dtype.is_floating_point else torch.float32
    return first.detach().to(dtype), second.detach().to(dtype)


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks ``0 .. P-1`` along dim 1, tied values sharing the mean of their ranks (as SciPy)."""
    sorted_values, order = values.sort(dim=1, stable=True)
    starts_group = torch.ones_like(sorted_values, dtype=torch.bool)
    starts_group[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    group = starts_group.cumsum(dim=1) - 1
    positions = torch.arange(values.shape[1], device=values.device, dtype=values.dtype)
    positions = positions.expand_as(values)
    rank_sums = torch.zeros_like(values).scatter_add_(1, group, positions)
    group_sizes = torch.zeros_like(values).scatter_add_(1, group, torch.ones_like(values))
    mean_ranks = (rank_sums / group_sizes.clamp_min(1)).gather(1, group)
    return torch.empty_like(values).scatter_(1, order, mean_ranks)


def spearman_correlation(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation between each example's two maps.

    Args:
        first: ``(N, ...)`` maps.
        second: ``(N, ...)`` maps of the same shape.

    Returns:
        ``(N,)`` in ``[-1, 1]``; 1 when the maps order the locations alike. 0 when either map is
        constant.
    """
    first, second = _paired(first, second)
    first_ranks = _average_ranks(first.flatten(1).double())
    second_ranks = _average_ranks(second.flatten(1).double())
    first_ranks = first_ranks - first_ranks.mean(dim=1, keepdim=True)
    second_ranks = second_ranks - second_ranks.mean(dim=1, keepdim=True)
    covariance = (first_ranks * second_ranks).sum(dim=1)
    scale = first_ranks.norm(dim=1) * second_ranks.norm(dim=1)
    correlation = torch.where(scale > 0, covariance / scale.clamp_min(1e-300), 0.0)
    return correlation.clamp(-1, 1).to(first.dtype)


def map_ssim(first: Tensor, second: Tensor) -> Tensor:
    """Structural similarity (scikit-image's ``structural_similarity``) between each example's maps.

    Each map is min-max normalised per example to ``[0, 1]`` first (so ``data_range=1``): SSIM then
    compares the maps' structure, not their scale, which differs between methods and models.
    Default window: 7x7 uniform, as scikit-image.

    Args:
        first: ``(N, 1, H, W)`` or ``(N, H, W)`` maps, at least 7x7 (upsample layer maps first).
        second: maps of the same shape.

    Returns:
        ``(N,)``, 1 for identical maps.
    """
    first, second = _paired(first, second)
    if first.dim() == 4 and first.shape[1] == 1:
        first, second = first[:, 0], second[:, 0]
    if first.dim() != 3:
        raise ValueError(f"SSIM needs (N, 1, H, W) or (N, H, W) maps, got {tuple(first.shape)}")
    if min(first.shape[-2:]) < 7:
        raise ValueError(
            f"SSIM's 7x7 window needs maps of at least 7x7, got {tuple(first.shape[-2:])}; "
            "upsample them to the image first"
        )
    first_np = normalize_per_example(first.double()).cpu().numpy()
    second_np = normalize_per_example(second.double()).cpu().numpy()
    values = [structural_similarity(a, b, data_range=1.0) for a, b in zip(first_np, second_np)]
    return torch.as_tensor(np.asarray(values), dtype=first.dtype, device=first.device)


def class_selectivity(maps: Tensor, other_maps: Tensor) -> Tensor:
    """Rank correlation between the maps of two targets on the same inputs.

    Pass the maps for the target (e.g. the top-1 class) and for another class (e.g. the second or
    the last). A class-selective method draws different maps for different classes: **lower is
    more selective**. This is how order-0 NormGrad (not selective: it also highlights evidence for
    competing classes) differs from order 1 and Grad-CAM.

    Args:
        maps: ``(N, 1, h, w)`` maps for the target.
        other_maps: ``(N, 1, h, w)`` maps for the other class, same method and layer.

    Returns:
        ``(N,)`` Spearman correlations in ``[-1, 1]``.
    """
    return spearman_correlation(maps, other_maps)


def contrast_classes(outputs: Tensor, targets: Tensor, contrast: str = "second") -> Tensor:
    """The other class whose maps :func:`class_selectivity` compares with the target's.

    Args:
        outputs: ``(N, classes)`` model outputs.
        targets: ``(N,)`` the explained classes.
        contrast: ``"second"`` (the best-scoring other class: the hardest to tell apart) or
            ``"last"`` (the worst-scoring class).

    Returns:
        ``(N,)`` class indices, never the target.
    """
    if contrast not in ("second", "last"):
        raise ValueError(f"contrast must be 'second' or 'last', got {contrast!r}")
    scores = outputs.detach().clone().float()
    if contrast == "second":
        scores.scatter_(1, targets[:, None], -torch.inf)
        return scores.argmax(dim=1)
    scores.scatter_(1, targets[:, None], torch.inf)
    return scores.argmin(dim=1)
