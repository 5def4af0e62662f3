"""TorchRay's pointing-game protocol (Zhang et al. 2016, as ``torchray.benchmark.pointing_game``).

- One map per ground-truth class present in the image (:meth:`EvaluationDataset.pair_classes`;
  for VOC, a class whose every box is ``difficult`` is skipped).
- The map is upsampled to the ORIGINAL image, its maximum (first in raster order) is the point; a
  hit when a pixel of the class (the union of its boxes for VOC, of its instance masks for COCO)
  lies at Euclidean distance strictly below ``tolerance`` (15 pixels of the original image).
- Accuracy: hits / pairs per class, then the mean over classes
  (:func:`captum_normgrad.metrics.pointing_game_accuracy`). TorchRay's mean also counts a class
  that has no pair as 0; here such a class is left out (the two agree on VOC07 and COCO14, where
  every class has pairs).
- The *difficult* subset of the EBP paper: the (image, class) pairs flagged in TorchRay's files
  ``pointing_game_ebp_voc07_difficult.txt`` / ``pointing_game_ebp_coco_difficult.txt`` (a row per
  image: its name, then a 0/1 flag per class). A pair is in the subset when its flag is 1, or when
  its image has no row (TorchRay's rule). The files are TorchRay's (CC BY-NC 4.0), not bundled:
  pass the path of your copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from captum_normgrad.metrics import pointing_game

__all__ = ["DifficultFlags", "in_difficult_subset", "pointing_hits", "read_difficult_flags"]

DifficultFlags = dict[str, tuple[bool, ...]]


def read_difficult_flags(path: str | os.PathLike, num_classes: int) -> DifficultFlags:
    """Read a TorchRay difficult-subset file: ``name<TAB>flag<TAB>flag...`` per image.

    Raises:
        ValueError: a missing file, a row with another number of flags than ``num_classes``, or a
            flag other than 0 / 1 (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"difficult-subset file not found: {path}")
    flags: DifficultFlags = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, *values = line.strip().split("\t")
        if len(values) != num_classes or any(value not in ("0", "1") for value in values):
            raise ValueError(
                f"{path}:{number}: expected the image name and {num_classes} flags 0/1 separated "
                f"by tabs, got {len(values)} values"
            )
        flags[name] = tuple(value == "1" for value in values)
    return flags


def in_difficult_subset(flags: DifficultFlags, image_id: str, class_index: int) -> bool:
    """Whether the pair (image, class) belongs to the EBP difficult subset (TorchRay's rule)."""
    image_flags = flags.get(image_id)
    return image_flags is None or image_flags[class_index]


def pointing_hits(maps: Tensor, masks: Tensor, tolerance: float = 15) -> Tensor:
    """Hit (1.0) or miss (0.0) per pair, on maps and masks at the original image size.

    Args:
        maps: ``(K, 1, H, W)`` maps over the original image
            (:func:`~captum_normgrad.evaluation.maps_at_original_size`).
        masks: ``(K, H, W)`` boolean ground truth of each pair's class.
        tolerance: pixels of the original image.

    Returns:
        ``(K,)`` float64. A pair whose mask is empty (a COCO polygon too small to cover a pixel)
        is a miss, as in TorchRay.
    """
    empty = ~masks.flatten(1).any(dim=1)
    hits = torch.zeros(len(masks), dtype=torch.float64)
    if (~empty).any():
        hits[~empty] = pointing_game(
            maps[~empty].double(), masks=masks[~empty], tolerance=tolerance
        ).double()
    return hits
