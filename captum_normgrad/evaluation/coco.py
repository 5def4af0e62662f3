"""COCO: ``annotations/instances_<split>.json`` and the images in ``<split>/``.

Read through pycocotools (the ``coco`` extra), which decodes the polygon and RLE masks exactly as
the COCO evaluation does. Classes are the categories sorted by id, so class ``k`` is the ``k``-th
output of a classifier trained on COCO's 80 classes (TorchRay's order). Every annotation counts,
crowd regions included, as in TorchRay's ``coco_as_mask``; an image without any is not explained.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from captum_normgrad.evaluation.dataset import Annotation, EvaluationDataset, Example

__all__ = ["COCODataset"]


def _pycocotools():
    try:
        from pycocotools.coco import COCO
    except ImportError as error:
        raise ImportError(
            "reading COCO needs pycocotools: pip install 'captum-normgrad[coco]'"
        ) from error
    return COCO


class COCODataset(EvaluationDataset):
    """The images of one COCO split with their boxes and instance masks.

    Args:
        root: the folder holding ``annotations/`` and the split's image folder.
        split: ``val2014``, ``val2017``... (names the json file and the image folder).

    Raises:
        ValueError: a missing annotation file or image folder (naming it), a category id the json
            does not declare.
        ImportError: pycocotools is not installed (the message names the extra).
    """

    def __init__(self, root: str | os.PathLike, split: str = "val2014") -> None:
        root = Path(root)
        annotation_file = root / "annotations" / f"instances_{split}.json"
        images = root / split
        for needed in (annotation_file, images):
            if not needed.exists():
                raise ValueError(
                    f"{needed} does not exist: give the COCO folder holding annotations/ and "
                    f"{split}/ (the split names both)"
                )
        coco_class = _pycocotools()
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            self._coco = coco_class(str(annotation_file))
        category_ids = sorted(self._coco.getCatIds())
        self._class_of = {category: index for index, category in enumerate(category_ids)}
        self.classes = [self._coco.cats[category]["name"] for category in category_ids]
        self.examples = []
        self._coco_ids: dict[str, int] = {}
        for image_id in sorted(self._coco.getImgIds()):
            image = self._coco.imgs[image_id]
            annotations = []
            for annotation in self._coco.imgToAnns.get(image_id, []):
                if annotation["category_id"] not in self._class_of:
                    raise ValueError(
                        f"{annotation_file}: annotation {annotation['id']} has category "
                        f"{annotation['category_id']}, which the file does not declare"
                    )
                x, y, width, height = (float(value) for value in annotation["bbox"])
                annotations.append(
                    Annotation(
                        self._class_of[annotation["category_id"]], (x, y, x + width, y + height)
                    )
                )
            self._coco_ids[Path(image["file_name"]).stem] = image_id
            self.examples.append(
                Example(
                    Path(image["file_name"]).stem,
                    images / image["file_name"],
                    (int(image["height"]), int(image["width"])),
                    tuple(annotations),
                )
            )

    def class_mask(self, example: Example, class_index: int, size: tuple[int, int]) -> Tensor:
        """The union of the instance masks of ``class_index`` (decoded by pycocotools)."""
        mask = torch.zeros(size, dtype=torch.bool)
        image_id = self._coco_ids[example.image_id]
        for annotation in self._coco.imgToAnns.get(image_id, []):
            if self._class_of[annotation["category_id"]] == class_index:
                with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation notice
                    warnings.simplefilter("ignore", DeprecationWarning)
                    decoded = self._coco.annToMask(annotation)
                mask |= torch.from_numpy(decoded).bool()
        return mask
