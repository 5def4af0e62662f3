"""The pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", 2016).

The map's maximum, after upsampling to the image, is a *hit* when a ground-truth pixel lies within
``tolerance`` pixels of it (Euclidean distance strictly below ``tolerance``, as TorchRay's
reference benchmark: ``tolerance=1`` asks for the maximum to be on the object itself). The
benchmark's accuracy is hits / (hits + misses) per class, averaged over classes; **higher is
better**. The benchmark evaluates each (image, class present in it) pair, so build one example per
pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from captum_normgrad.metrics._checks import image_maps, image_size_of
from captum_normgrad.metrics._ground_truth import Boxes, Masks, box_masks, example_masks

__all__ = ["map_maxima", "pointing_game", "pointing_game_accuracy"]


def map_maxima(maps: Tensor, image_size: Sequence[int]) -> Tensor:
    """Where each map peaks after upsampling to ``image_size``: ``(N, 2)`` as ``(row, col)``.

    Ties go to the first maximum in raster order.
    """
    upsampled = image_maps(maps, image_size)
    width = upsampled.shape[-1]
    flat_index = upsampled.flatten(1).argmax(dim=1)
    return torch.stack([flat_index // width, flat_index % width], dim=1)


def pointing_game(
    maps: Tensor,
    *,
    boxes: Boxes | None = None,
    masks: Masks | None = None,
    image_size: Sequence[int] | None = None,
    tolerance: float = 15,
) -> Tensor:
    """Hit or miss per example.

    Args:
        maps: ``(N, 1, h, w)`` maps at any resolution.
        boxes: the ground truth as boxes ``(x_min, y_min, x_max, y_max)`` in pixel indices,
            half-open like slicing (a box covers ``mask[y_min:y_max, x_min:x_max]``): ``(N, 4)``,
            or per example a ``(K, 4)`` tensor or ``None``. Needs ``image_size``.
        masks: or the ground truth as masks: ``(N, H, W)``, or per example an ``(H, W)`` mask or
            ``None``. ``image_size`` is theirs.
        image_size: ``(H, W)`` of the images the boxes refer to.
        tolerance: in pixels of the image, ``> 0``; 15 is the benchmark's value.

    Returns:
        ``(N,)`` float: ``1.0`` hit, ``0.0`` miss, ``NaN`` for an example given ``None`` (skipped;
        :func:`pointing_game_accuracy` leaves it out, and a plain ``mean()`` cannot hide it).

    Raises:
        ValueError: both or neither of ``boxes`` / ``masks``, boxes outside the image, empty boxes
            or masks, a count that differs from the maps', non-finite maps.
    """
    if (boxes is None) == (masks is None):
        raise ValueError("give the ground truth as exactly one of boxes= or masks=")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"tolerance must be a positive number of pixels, got {tolerance!r}")
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a tensor (N, 1, h, w), got {type(maps).__name__}")
    num_examples, device = maps.shape[0], maps.device
    if masks is not None:
        ground_truth, present, mask_size = example_masks(masks, num_examples, device)
        if image_size is not None and image_size_of(image_size) != mask_size:
            raise ValueError(f"image_size {tuple(image_size)} differs from the masks' {mask_size}")
        image_size = mask_size
    else:
        if image_size is None:
            raise ValueError("give image_size=(H, W): boxes are in the image's pixels")
        image_size = image_size_of(image_size)
        ground_truth, present = box_masks(boxes, num_examples, image_size, device)
    peaks = map_maxima(maps, image_size).double()
    rows = torch.arange(image_size[0], device=device, dtype=torch.float64)
    cols = torch.arange(image_size[1], device=device, dtype=torch.float64)
    row_gaps = (rows[None, :] - peaks[:, :1]) ** 2
    col_gaps = (cols[None, :] - peaks[:, 1:]) ** 2
    within = row_gaps[:, :, None] + col_gaps[:, None, :] < float(tolerance) ** 2
    hits = (within & ground_truth).flatten(1).any(dim=1)
    dtype = maps.dtype if maps.is_floating_point() else torch.float32
    return torch.where(present, hits.to(dtype), torch.nan)


def pointing_game_accuracy(hits: Tensor, classes: Tensor | Sequence[int] | None = None) -> Tensor:
    """The benchmark's accuracy: per class, hits / evaluated examples; then the mean over classes.

    Args:
        hits: ``(N,)`` from :func:`pointing_game` (``NaN`` = skipped).
        classes: ``(N,)`` class of each example; ``None`` treats all as one class (plain accuracy).

    Returns:
        A scalar in ``[0, 1]``; **higher is better**. Classes with no evaluated example are left
        out of the mean.

    Raises:
        ValueError: no example was evaluated, or ``classes`` does not match ``hits``.
    """
    if hits.dim() != 1:
        raise ValueError(f"hits must be (N,), got shape {tuple(hits.shape)}")
    evaluated = ~torch.isnan(hits)
    if not evaluated.any():
        raise ValueError("no example has ground truth; the pointing game is undefined")
    if classes is None:
        return hits[evaluated].mean()
    classes = torch.as_tensor(classes, device=hits.device)
    if classes.shape != hits.shape:
        raise ValueError(f"classes of shape {tuple(classes.shape)} for hits of {tuple(hits.shape)}")
    classes = classes[evaluated]
    present_classes = classes.unique()
    per_class = torch.stack([hits[evaluated][classes == c].mean() for c in present_classes])
    return per_class.mean()
