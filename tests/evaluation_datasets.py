"""Tiny data sets in the VOC and COCO layouts, written by the tests, and the tiny VOC classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

# image id -> (height, width), objects (class name, 1-based inclusive VOC box, difficult)
VOC_IMAGES = {
    "000001": ((24, 32), [("cat", (3, 2, 12, 10), False), ("dog", (20, 12, 30, 22), False)]),
    "000002": ((30, 20), [("person", (1, 1, 20, 30), False), ("cat", (5, 5, 8, 9), True)]),
    "000003": ((20, 28), [("car", (10, 4, 18, 16), False), ("car", (2, 2, 6, 6), True)]),
    "000004": ((26, 26), [("bird", (8, 8, 14, 14), False)]),
    "000005": ((22, 30), [("dog", (1, 1, 30, 22), False), ("bus", (4, 6, 9, 12), False)]),
}


def _random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_voc(root: Path, images: dict = VOC_IMAGES, split: str = "test") -> Path:
    """A VOC year folder with PNG images (read back exactly) and one XML per image."""
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for seed, (image_id, ((height, width), objects)) in enumerate(images.items()):
        Image.fromarray(_random_image(height, width, seed)).save(
            root / "JPEGImages" / f"{image_id}.png"
        )
        xml_objects = "".join(
            f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{box[0]}</xmin>"
            f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
            for name, box, difficult in objects
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{image_id}.png</filename><size>"
            f"<width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"{xml_objects}</annotation>"
        )
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return root


def write_coco(root: Path, split: str = "val2014") -> dict:
    """A COCO folder: three images, categories with gaps in their ids, an RLE and a polygon mask."""
    (root / "annotations").mkdir(parents=True)
    (root / split).mkdir()
    images = [(42, 12, 16), (7, 10, 10), (99, 8, 14)]  # id, height, width
    for seed, (image_id, height, width) in enumerate(images):
        Image.fromarray(_random_image(height, width, seed)).save(
            root / split / f"COCO_{split}_{image_id:012d}.png"
        )
    rle_mask = np.zeros((12, 16), dtype=bool)
    rle_mask[2:5, 3:9] = True  # rows 2-4, columns 3-8
    rle_mask[6, 10] = True
    counts, previous, run = [], False, 0
    for value in rle_mask.T.flatten():  # COCO's RLE runs down the columns
        if value != previous:
            counts.append(run)
            previous, run = value, 0
        run += 1
    counts.append(run)
    data = {
        "images": [
            {"id": image_id, "file_name": f"COCO_{split}_{image_id:012d}.png", "height": h, "width": w}
            for image_id, h, w in images
        ],
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 3, "name": "car"},
            {"id": 18, "name": "dog"},
        ],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 18, "bbox": [3.0, 2.0, 8.0, 5.0], "area": 19.0,
             "iscrowd": 1, "segmentation": {"size": [12, 16], "counts": counts}},
            {"id": 2, "image_id": 42, "category_id": 1, "bbox": [0.5, 6.25, 4.0, 5.0], "area": 20.0,
             "iscrowd": 0, "segmentation": [[0.5, 6.25, 4.5, 6.25, 4.5, 11.25, 0.5, 11.25]]},
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [1.0, 1.0, 5.0, 6.0], "area": 30.0,
             "iscrowd": 0, "segmentation": [[1.0, 1.0, 6.0, 1.0, 6.0, 7.0, 1.0, 7.0]]},
        ],
    }  # fmt: skip
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return {"rle_mask": rle_mask}


def voc_classifier() -> nn.Sequential:
    """A tiny 20-class CNN with fixed random weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 20),
    ).eval()
    torch.random.set_rng_state(generator_state)
    return model


class CountingMethod:
    """Order-0 NormGrad at two layers of :func:`voc_classifier`, counting its calls; it raises
    once ``fail_after`` calls are done (a run killed part-way)."""

    def __init__(self, model: nn.Module, fail_after: int | None = None) -> None:
        from captum_normgrad import LayerNormGrad

        self._model = model
        self._method = LayerNormGrad(model, [model[0], model[2]])
        self.layers = self._method.layers
        self.calls = 0
        self.fail_after = fail_after

    def attribute(self, inputs: torch.Tensor, target=None, **kwargs) -> list[torch.Tensor]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("injected failure")
        self.calls += 1
        return self._method.attribute(inputs, target=target, **kwargs)
