"""The detection front door: images, targets and detection indices checked before any pass.

Each message names the argument (and the image and entry) at fault, so that a bad box is
refused here rather than deep inside torchvision's box coder, or not at all (a box beyond the
image is matched to anchors that do not exist; a label beyond the classifier indexes past it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from captum_normgrad.detection._families import Family

__all__ = ["checked_detections", "checked_images", "checked_targets"]


def checked_images(images: object) -> list[Tensor]:
    """``images`` as a list of ``(C, H, W)`` floating-point tensors, finite.

    Raises:
        TypeError: ``images`` is neither a list / tuple of tensors nor a tensor.
        ValueError: an image is not 3-D, not floating point, holds NaN or infinity, or the list
            is empty.
    """
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(
                f"images must be a list of (C, H, W) tensors or an (N, C, H, W) tensor, got a "
                f"tensor of shape {tuple(images.shape)}"
            )
        images = list(images)
    if not isinstance(images, (list, tuple)):
        raise TypeError(
            f"images must be a list of (C, H, W) tensors or an (N, C, H, W) tensor, got "
            f"{type(images).__name__}"
        )
    if not images:
        raise ValueError("images is empty; give at least one (C, H, W) image")
    for index, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise TypeError(f"images[{index}] is a {type(image).__name__}, not a tensor")
        if image.dim() != 3 or not image.is_floating_point():
            raise ValueError(
                f"images[{index}] must be a floating-point (C, H, W) tensor, got shape "
                f"{tuple(image.shape)} and dtype {image.dtype}"
            )
        if not torch.isfinite(image).all():
            raise ValueError(f"images[{index}] contains NaN or infinite values")
    return list(images)


def _check_boxes(boxes: object, where: str, height: int, width: int) -> int:
    if not isinstance(boxes, Tensor) or not boxes.is_floating_point():
        kind = boxes.dtype if isinstance(boxes, Tensor) else type(boxes).__name__
        raise TypeError(f'{where}["boxes"] must be a floating-point tensor, got {kind}')
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f'{where}["boxes"] must have shape (N, 4) as (x1, y1, x2, y2), got {tuple(boxes.shape)}'
        )
    if not torch.isfinite(boxes).all():
        raise ValueError(f'{where}["boxes"] contains NaN or infinite values')
    x1, y1, x2, y2 = boxes.unbind(1)
    empty = (x2 <= x1) | (y2 <= y1)
    outside = (x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height)
    for bad, rule in (
        (empty, "needs x2 > x1 and y2 > y1"),
        (
            outside,
            f"lies outside the {width} x {height} image (0 <= x1 < x2 <= W, "
            "0 <= y1 < y2 <= H, in the image's own pixels)",
        ),
    ):
        if bad.any():
            index = int(bad.nonzero()[0, 0])
            box = [round(float(v), 2) for v in boxes[index]]
            raise ValueError(f'{where}["boxes"][{index}] = {box} {rule}')
    return boxes.shape[0]


def _check_labels(labels: object, where: str, num_boxes: int, family: Family) -> None:
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f'{where}["labels"] must be an int64 tensor, got {kind}')
    if labels.shape != (num_boxes,):
        raise ValueError(
            f'{where}["labels"] must have shape ({num_boxes},), one per box, got '
            f"{tuple(labels.shape)}"
        )
    low = 1 if family.background_zero else 0
    high = family.num_classes
    outside = (labels < low) if high is None else (labels < low) | (labels >= high)
    if outside.any():
        bad = labels[outside].tolist()
        allowed = f"{low} or more" if high is None else f"in [{low}, {high - 1}]"
        background = " (0 is its background class)" if family.background_zero else ""
        raise ValueError(
            f'{where}["labels"] holds {bad}; this {family.name} takes labels {allowed}{background}'
        )


def _check_masks(masks: object, where: str, num_boxes: int, height: int, width: int) -> None:
    if not isinstance(masks, Tensor):
        raise TypeError(f'{where}["masks"] must be a tensor, got {type(masks).__name__}')
    if masks.shape != (num_boxes, height, width):
        raise ValueError(
            f'{where}["masks"] must have shape (N_boxes, H, W) = ({num_boxes}, {height}, {width}), '
            f"got {tuple(masks.shape)}"
        )


def checked_targets(targets: object, images: Sequence[Tensor], family: Family) -> list[dict]:
    """One target dict per image, checked against the image's size and the detector's classes.

    Raises:
        TypeError: ``targets`` is not a list of dicts, or an entry has the wrong type or dtype.
        ValueError: a wrong number of targets, a missing key, a wrong shape, a box outside its
            image or with ``x2 <= x1`` / ``y2 <= y1``, a label outside the detector's classes.
    """
    if targets is None:
        raise ValueError(
            "targets is None; the training loss needs one dict per image with 'boxes' (N, 4) and "
            "'labels' (N,); for the map of one detection's score, pass detection= instead"
        )
    if isinstance(targets, dict):
        targets = [targets]
    if not isinstance(targets, (list, tuple)):
        raise TypeError(
            f"targets must be a list of dicts, one per image, got {type(targets).__name__}"
        )
    if len(targets) != len(images):
        raise ValueError(f"targets has {len(targets)} entries for {len(images)} images")
    required = ("boxes", "labels", "masks") if family.needs_masks else ("boxes", "labels")
    for index, (target, image) in enumerate(zip(targets, images)):
        where = f"targets[{index}]"
        if not isinstance(target, dict):
            raise TypeError(f"{where} must be a dict, got {type(target).__name__}")
        missing = [key for key in required if key not in target]
        if missing:
            raise ValueError(f"{where} has no {missing} (a {family.name} needs {list(required)})")
        height, width = image.shape[-2:]
        num_boxes = _check_boxes(target["boxes"], where, height, width)
        _check_labels(target["labels"], where, num_boxes, family)
        if family.needs_masks:
            _check_masks(target["masks"], where, num_boxes, height, width)
    return list(targets)


def checked_detections(detection: object, num_images: int) -> list[int]:
    """One detection index per image, from an int (every image) or a list of them.

    Raises:
        TypeError: an index that is not an int.
        ValueError: a negative index, or a list of the wrong length.
    """
    indices = list(detection) if isinstance(detection, (list, tuple)) else [detection] * num_images
    if len(indices) != num_images:
        raise ValueError(f"detection has {len(indices)} entries for {num_images} images")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"detection must be an int or a list of ints, got {index!r}")
        if index < 0:
            raise ValueError(f"detection must be a non-negative index, got {index}")
    return indices
