"""Pascal VOC: ``JPEGImages/``, ``Annotations/<id>.xml``, ``ImageSets/Main/<split>.txt``.

Point the reader at the year's folder (``VOCdevkit/VOC2007``). Boxes are 1-based and inclusive in
the XML; they are converted to the half-open pixel boxes of :mod:`captum_normgrad.metrics`, the
pixels TorchRay's ``voc_as_mask`` marks. A class whose every object is ``difficult`` is not
explained in that image (TorchRay skips the pair); its mask still covers every box of the class.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from captum_normgrad.evaluation.dataset import Annotation, EvaluationDataset, Example

__all__ = ["VOC_CLASSES", "VOCDataset"]

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip
"""The 20 classes in the standard order (the index of a VOC-trained classifier's output)."""


def _text(element: ElementTree.Element, tag: str, where: Path) -> str:
    found = element.find(tag)
    if found is None or found.text is None:
        raise ValueError(f"{where}: no <{tag}> in the annotation")
    return found.text.strip()


def _coordinate(box: ElementTree.Element, tag: str, where: Path) -> int:
    text = _text(box, tag, where)
    try:
        return int(float(text))
    except ValueError:
        raise ValueError(f"{where}: <{tag}> is {text!r}, not a number") from None


def _read_annotation(path: Path, image_id: str, images: Path) -> Example:
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise ValueError(f"cannot read the annotation {path}: {error}") from error
    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}: no <size> in the annotation")
    height = _coordinate(size, "height", path)
    width = _coordinate(size, "width", path)
    annotations = []
    for element in root.findall("object"):
        name = _text(element, "name", path)
        if name not in VOC_CLASSES:
            raise ValueError(f"{path}: unknown class {name!r}; VOC's classes are {VOC_CLASSES}")
        box = element.find("bndbox")
        if box is None:
            raise ValueError(f"{path}: an object without <bndbox>")
        x_min, y_min, x_max, y_max = (
            _coordinate(box, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        difficult = element.find("difficult")
        annotations.append(
            Annotation(
                VOC_CLASSES.index(name),
                (float(x_min - 1), float(y_min - 1), float(x_max), float(y_max)),
                difficult is not None and (difficult.text or "0").strip() == "1",
            )
        )
    filename = root.find("filename")
    name = filename.text.strip() if filename is not None and filename.text else f"{image_id}.jpg"
    return Example(image_id, images / name, (height, width), tuple(annotations))


class VOCDataset(EvaluationDataset):
    """The images of one split of a Pascal VOC year, with their boxes and ``difficult`` flags.

    Args:
        root: the year's folder, holding ``JPEGImages``, ``Annotations`` and ``ImageSets/Main``.
        split: the list in ``ImageSets/Main`` (``test``, ``val``, ``trainval``...).

    Raises:
        ValueError: a missing folder or split file (naming it), an unreadable annotation, a class
            outside VOC's twenty.
    """

    def __init__(self, root: str | os.PathLike, split: str = "test") -> None:
        root = Path(root)
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        for needed in (root / "JPEGImages", root / "Annotations", split_file):
            if not needed.exists():
                raise ValueError(
                    f"{needed} does not exist: give the VOC year's folder (e.g. "
                    "VOCdevkit/VOC2007) and a split listed in its ImageSets/Main"
                )
        image_ids = [
            line.split()[0] for line in split_file.read_text().splitlines() if line.strip()
        ]
        self.classes = list(VOC_CLASSES)
        self.examples = [
            _read_annotation(
                root / "Annotations" / f"{image_id}.xml", image_id, root / "JPEGImages"
            )
            for image_id in image_ids
        ]

    def pair_classes(self, example: Example) -> list[int]:
        """Classes with at least one object not marked difficult (TorchRay's benchmark)."""
        return sorted({a.class_index for a in example.annotations if not a.difficult})
