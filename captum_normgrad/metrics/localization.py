"""Box localization from a thresholded map (CAM, Zhou et al. 2016; Grad-CAM, Selvaraju et al. 2017).

Each map is upsampled to the image, min-max normalised to ``[0, 1]`` (CAM's ``mat2gray``), and the
pixels strictly above ``threshold`` (0.2 in CAM, 0.15 in Grad-CAM) form the foreground: for maps
whose minimum is 0, such as Grad-CAM's, that is ``threshold * max``. The box around the largest
8-connected component (``scipy.ndimage.label``) is the predicted box. Its IoU with the best-matching
ground-truth box is the score (**higher is better**); localization accuracy is the fraction of
examples with IoU >= 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchvision.ops import box_iou

from captum_normgrad.combine import normalize_per_example
from captum_normgrad.metrics._checks import image_maps, image_size_of
from captum_normgrad.metrics._ground_truth import Boxes, example_boxes

__all__ = ["localization_accuracy", "localization_hits", "localization_iou", "saliency_boxes"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _check_fraction(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    return float(threshold)


def saliency_boxes(maps: Tensor, image_size: Sequence[int], threshold: float = 0.2) -> Tensor:
    """The box of the largest connected component of each thresholded map.

    Args:
        maps: ``(N, 1, h, w)`` maps at any resolution.
        image_size: ``(H, W)`` of the image the boxes are in.
        threshold: the fraction of the normalised maximum, in ``[0, 1)``.

    Returns:
        ``(N, 4)`` long boxes ``(x_min, y_min, x_max, y_max)``, half-open pixel indices. A constant
        map has no foreground and gets the empty box ``(0, 0, 0, 0)`` (IoU 0 with anything).
        Among components of equal size, the first in raster order wins.
    """
    threshold = _check_fraction(threshold)
    image_size = image_size_of(image_size)
    normalised = normalize_per_example(image_maps(maps, image_size))[:, 0]
    foreground = (normalised > threshold).cpu().numpy()
    boxes = torch.zeros((foreground.shape[0], 4), dtype=torch.long)
    for index, mask in enumerate(foreground):
        labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if count == 0:
            continue
        largest = int(np.bincount(labels.ravel())[1:].argmax()) + 1
        rows, cols = ndimage.find_objects(labels)[largest - 1]
        boxes[index] = torch.tensor([cols.start, rows.start, cols.stop, rows.stop])
    return boxes.to(maps.device)


def localization_iou(
    maps: Tensor, boxes: Boxes, image_size: Sequence[int], threshold: float = 0.2
) -> Tensor:
    """IoU of each map's box (:func:`saliency_boxes`) with its best-matching ground-truth box.

    Args:
        maps: ``(N, 1, h, w)`` maps at any resolution.
        boxes: ``(N, 4)``, or per example a ``(K, 4)`` tensor or ``None`` (skipped), in the
            half-open pixel convention of :func:`saliency_boxes`.
        image_size: ``(H, W)`` of the images the boxes refer to.
        threshold: the fraction of the normalised maximum, in ``[0, 1)``.

    Returns:
        ``(N,)`` IoU in ``[0, 1]``, ``NaN`` for skipped examples; **higher is better**.

    Raises:
        ValueError: boxes outside the image, empty, or not one entry per map; non-finite maps.
    """
    image_size = image_size_of(image_size)
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a tensor (N, 1, h, w), got {type(maps).__name__}")
    truth = example_boxes(boxes, maps.shape[0], image_size)
    predicted = saliency_boxes(maps, image_size, threshold).double().cpu()
    dtype = maps.dtype if maps.is_floating_point() else torch.float32
    ious = torch.full((maps.shape[0],), torch.nan, dtype=torch.float64)
    for index, example in enumerate(truth):
        if example is not None:
            ious[index] = box_iou(predicted[index : index + 1], example.cpu()).max()
    return ious.to(device=maps.device, dtype=dtype)


def localization_hits(ious: Tensor, min_iou: float = 0.5) -> Tensor:
    """Per example, 1 where the IoU reaches ``min_iou``, else 0; ``NaN`` (skipped) stays ``NaN``.

    An example without ground truth is skipped, not a miss: ``NaN >= 0.5`` would read as a miss.
    """
    return torch.where(ious.isnan(), ious, (ious >= min_iou).to(ious.dtype))


def localization_accuracy(ious: Tensor, min_iou: float = 0.5) -> Tensor:
    """The fraction of evaluated examples (``NaN`` = skipped) whose IoU reaches ``min_iou``."""
    evaluated = ~torch.isnan(ious)
    if not evaluated.any():
        raise ValueError("no example has ground-truth boxes; localization accuracy is undefined")
    return localization_hits(ious[evaluated], min_iou).mean()
