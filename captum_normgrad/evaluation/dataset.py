"""What every reader yields: images on disk with their ground truth at the original size.

A reader lists :class:`Example` records without opening the images, so a process under torchrun
touches only its own share of the files. The unit the metrics score is a *pair* (image, class): one
per ground-truth class present in the image (TorchRay's pointing-game protocol), or one per image
for a folder of classes without boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Annotation", "EvaluationDataset", "Example", "read_image"]


@dataclass(frozen=True)
class Annotation:
    """One object of the ground truth.

    Attributes:
        class_index: the object's class, an index into the reader's ``classes``.
        box: ``(x_min, y_min, x_max, y_max)`` in pixels of the original image, half-open like
            slicing (``mask[y_min:y_max, x_min:x_max]``), the convention of
            :mod:`captum_normgrad.metrics`. A 1-based inclusive VOC box ``(1, 1, 10, 10)`` becomes
            ``(0, 0, 10, 10)``.
        difficult: Pascal VOC's ``difficult`` flag (hard to recognise without context).
    """

    class_index: int
    box: tuple[float, float, float, float]
    difficult: bool = False


@dataclass(frozen=True)
class Example:
    """One image of a data set, not yet read.

    Attributes:
        image_id: a name unique in the data set (the file name without its extension), the key of
            the results.
        path: the image file.
        size: ``(H, W)`` of the original image, as the annotation states it (``None`` when the
            layout does not say; the image's own size is used then).
        annotations: the objects (empty for a folder of classes).
        label: the image's class for a folder of classes, else ``None``.
    """

    image_id: str
    path: Path
    size: tuple[int, int] | None
    annotations: tuple[Annotation, ...] = ()
    label: int | None = None


class EvaluationDataset(Sequence[Example]):
    """A list of :class:`Example` plus the classes' names and each pair's ground-truth mask.

    Subclasses fill ``classes`` and ``examples`` and say which classes of an image to explain and
    which pixels belong to a class.
    """

    classes: list[str]
    examples: list[Example]
    has_ground_truth: bool = True

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):  # type: ignore[override]
        return self.examples[index]

    def pair_classes(self, example: Example) -> list[int]:
        """The classes to explain in ``example``, ascending: one map (and one row) each."""
        if example.label is not None:
            return [example.label]
        return sorted({annotation.class_index for annotation in example.annotations})

    def class_mask(self, example: Example, class_index: int, size: tuple[int, int]) -> Tensor:
        """The ``(H, W)`` pixels covered by the objects of ``class_index`` (every box by default)."""
        height, width = size
        rows = torch.arange(height)[:, None]
        cols = torch.arange(width)[None, :]
        mask = torch.zeros((height, width), dtype=torch.bool)
        for annotation in example.annotations:
            if annotation.class_index == class_index:
                x_min, y_min, x_max, y_max = annotation.box
                mask |= (rows >= y_min) & (rows < y_max) & (cols >= x_min) & (cols < x_max)
        return mask


def read_image(example: Example) -> Tensor:
    """The example's image as ``(3, H, W)`` float in ``[0, 1]`` (grey and RGBA become RGB).

    Raises:
        ValueError: the file is missing or unreadable, or its size differs from the annotation's
            (boxes would then point at the wrong pixels).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(example.path) as image:
            array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
            width, height = image.size
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {example.path}: {error}") from error
    if example.size is not None and example.size != (height, width):
        raise ValueError(
            f"{example.path} is {height}x{width} but its annotation says "
            f"{example.size[0]}x{example.size[1]}; the boxes would not fit the image"
        )
    return array.view(height, width, 3).permute(2, 0, 1).float() / 255.0
