"""Ground truth for the localisation metrics: boxes and masks, validated, one entry per example.

Boxes are ``(x_min, y_min, x_max, y_max)`` in pixel indices, half-open like slicing: the box covers
``mask[y_min:y_max, x_min:x_max]``, so its area is ``(x_max - x_min) * (y_max - y_min)`` (the
convention of ``torchvision.ops.box_iou``). For a 1-based inclusive VOC box, subtract 1 from
``x_min`` and ``y_min``. ``None`` marks an example without ground truth: it is skipped. An empty box
list or an all-false mask is refused instead, since it is usually a bug upstream (wrong class id,
wrong threshold) that would otherwise count as a silent miss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Boxes", "Masks", "box_masks", "example_boxes", "example_masks"]

Boxes = Tensor | Sequence[Tensor | None]
"""A ``(N, 4)`` tensor (one box per example), or per example a ``(K, 4)`` tensor or ``None``."""

Masks = Tensor | Sequence[Tensor | None]
"""A ``(N, H, W)`` boolean (or 0/1) tensor, or per example an ``(H, W)`` mask or ``None``."""


def _per_example(entries: object, num_examples: int, what: str) -> list[Tensor | None]:
    if isinstance(entries, Tensor):
        entries = list(entries)
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise TypeError(f"{what} must be a tensor or a list with one entry per example")
    if len(entries) != num_examples:
        raise ValueError(
            f"{what} have {len(entries)} entries for {num_examples} maps; give one per example "
            "(None where there is none)"
        )
    for index, entry in enumerate(entries):
        if entry is not None and not isinstance(entry, Tensor):
            raise TypeError(f"example {index}: {what} must be a tensor or None, got {entry!r}")
    return list(entries)


def _check_boxes(boxes: Tensor, image_size: tuple[int, int], where: str) -> Tensor:
    if boxes.dim() == 1:
        boxes = boxes[None]
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must have shape (K, 4), got {tuple(boxes.shape)}")
    if boxes.shape[0] == 0:
        raise ValueError(f"{where}: no boxes; mark an example without ground truth with None")
    boxes = boxes.double()
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{where}: boxes contain NaN or infinite values")
    height, width = image_size
    x_min, y_min, x_max, y_max = boxes.unbind(1)
    if (x_min < 0).any() or (y_min < 0).any() or (x_max > width).any() or (y_max > height).any():
        raise ValueError(
            f"{where}: a box lies outside the {height}x{width} image: {boxes.tolist()} (boxes are "
            "(x_min, y_min, x_max, y_max) pixel indices, half-open; is image_size right?)"
        )
    if (x_max <= x_min).any() or (y_max <= y_min).any():
        raise ValueError(
            f"{where}: an empty box (x_max <= x_min or y_max <= y_min): {boxes.tolist()}"
        )
    return boxes


def example_boxes(
    boxes: Boxes, num_examples: int, image_size: tuple[int, int]
) -> list[Tensor | None]:
    """Validated float64 ``(K, 4)`` boxes per example (``None`` kept)."""
    entries = _per_example(boxes, num_examples, "boxes")
    return [
        None if entry is None else _check_boxes(entry, image_size, f"example {index}")
        for index, entry in enumerate(entries)
    ]


def box_masks(
    boxes: Boxes, num_examples: int, image_size: tuple[int, int], device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(N, H, W)`` masks covered by each example's boxes, and which examples have any."""
    height, width = image_size
    rows = torch.arange(height, device=device, dtype=torch.float64)[:, None]
    cols = torch.arange(width, device=device, dtype=torch.float64)[None, :]
    masks = torch.zeros((num_examples, height, width), dtype=torch.bool, device=device)
    present = torch.zeros(num_examples, dtype=torch.bool, device=device)
    for index, entry in enumerate(example_boxes(boxes, num_examples, image_size)):
        if entry is None:
            continue
        present[index] = True
        for x_min, y_min, x_max, y_max in entry.tolist():
            masks[index] |= (rows >= y_min) & (rows < y_max) & (cols >= x_min) & (cols < x_max)
    return masks, present


def example_masks(
    masks: Masks, num_examples: int, device: torch.device
) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """``(N, H, W)`` bool masks (all false where absent), which examples have one, ``(H, W)``."""
    entries = _per_example(masks, num_examples, "masks")
    sizes = {tuple(entry.shape[-2:]) for entry in entries if entry is not None}
    if len(sizes) != 1:
        raise ValueError(
            "no example has a mask" if not sizes else f"masks of several sizes {sorted(sizes)}"
        )
    image_size = sizes.pop()
    stacked = torch.zeros((num_examples, *image_size), dtype=torch.bool, device=device)
    present = torch.zeros(num_examples, dtype=torch.bool, device=device)
    for index, entry in enumerate(entries):
        if entry is None:
            continue
        where = f"example {index}"
        if entry.dim() == 3 and entry.shape[0] == 1:
            entry = entry[0]
        if entry.dim() != 2:
            raise ValueError(f"{where}: a mask must be (H, W), got {tuple(entry.shape)}")
        if entry.dtype != torch.bool:
            if entry.is_complex() or ((entry != 0) & (entry != 1)).any():
                raise ValueError(f"{where}: a mask must be boolean or hold only 0 and 1")
            entry = entry != 0
        if not entry.any():
            raise ValueError(
                f"{where}: the mask is empty; mark an example without ground truth with None"
            )
        stacked[index] = entry.to(device)
        present[index] = True
    return stacked, present, image_size
