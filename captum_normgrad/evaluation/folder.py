"""A folder per class (torchvision's ``ImageFolder`` layout), no boxes: no pointing game or localization.

Classes are the sub-folders in sorted order, so ``ImageNet val`` arranged by synset gives the
standard ImageNet indices.
"""

from __future__ import annotations

import os
from pathlib import Path

from captum_normgrad.evaluation.dataset import EvaluationDataset, Example

__all__ = ["IMAGE_SUFFIXES", "ImageFolderDataset"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp"})


class ImageFolderDataset(EvaluationDataset):
    """Every image under ``root/<class>/``, labelled with its folder's index.

    Args:
        root: the folder of class folders.

    Raises:
        ValueError: ``root`` is missing or holds no class folder with an image, or two images share
            a name (the results are keyed by it).
    """

    has_ground_truth = False

    def __init__(self, root: str | os.PathLike) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"{root} is not a folder: give a folder with one sub-folder per class")
        self.classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        self.examples = []
        seen: dict[str, Path] = {}
        for index, name in enumerate(self.classes):
            for path in sorted((root / name).iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                image_id = f"{name}/{path.stem}"
                if image_id in seen:
                    raise ValueError(
                        f"two images are named {image_id}: {seen[image_id]} and {path}"
                    )
                seen[image_id] = path
                self.examples.append(Example(image_id, path, None, label=index))
        if not self.examples:
            raise ValueError(f"no image under {root}/<class>/ (suffixes {sorted(IMAGE_SUFFIXES)})")
