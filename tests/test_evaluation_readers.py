"""The data set readers read back exactly what a test wrote in the VOC, COCO and folder layouts."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from evaluation_datasets import VOC_IMAGES, write_coco, write_voc
from PIL import Image

from captum_normgrad.evaluation import (
    VOC_CLASSES,
    COCODataset,
    ImageFolderDataset,
    VOCDataset,
    open_dataset,
    read_image,
)


def test_voc_reads_back_boxes_sizes_difficult_flags_and_pixels(tmp_path):
    dataset = VOCDataset(write_voc(tmp_path / "VOC2007"))
    assert [example.image_id for example in dataset] == list(VOC_IMAGES)
    for seed, (example, (size, objects)) in enumerate(zip(dataset, VOC_IMAGES.values())):
        assert example.size == size
        expected = [
            (VOC_CLASSES.index(name), (x0 - 1.0, y0 - 1.0, float(x1), float(y1)), difficult)
            for name, (x0, y0, x1, y1), difficult in objects
        ]
        assert [(a.class_index, a.box, a.difficult) for a in example.annotations] == expected
        pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
        assert torch.equal(read_image(example), torch.from_numpy(pixels).permute(2, 0, 1) / 255.0)
    cat, person, car = (VOC_CLASSES.index(name) for name in ("cat", "person", "car"))
    # 000002's only cat is difficult: TorchRay does not explain the cat there.
    assert dataset.pair_classes(dataset[1]) == [person]
    # 000003 has a difficult car beside an easy one: the car is explained, the mask covers both.
    assert dataset.pair_classes(dataset[2]) == [car]
    mask = dataset.class_mask(dataset[2], car, (20, 28))
    expected = torch.zeros(20, 28, dtype=torch.bool)
    expected[3:16, 9:18] = True  # VOC (10, 4, 18, 16), 1-based inclusive
    expected[1:6, 1:6] = True  # VOC (2, 2, 6, 6)
    assert torch.equal(mask, expected)
    assert dataset.pair_classes(dataset[0]) == sorted([cat, VOC_CLASSES.index("dog")])


def test_voc_refuses_a_missing_split_and_an_image_of_another_size(tmp_path):
    root = write_voc(tmp_path / "VOC2007")
    with pytest.raises(ValueError, match="val.txt does not exist"):
        VOCDataset(root, split="val")
    dataset = VOCDataset(root)
    Image.new("RGB", (5, 5)).save(dataset[0].path)
    with pytest.raises(ValueError, match="5x5 but its annotation says 24x32"):
        read_image(dataset[0])


def test_coco_reads_back_classes_boxes_and_masks(tmp_path):
    written = write_coco(tmp_path)
    dataset = COCODataset(tmp_path, "val2014")
    assert dataset.classes == ["person", "car", "dog"]  # categories 1, 3, 18: indices 0, 1, 2
    assert [example.image_id for example in dataset] == [
        f"COCO_val2014_{image_id:012d}" for image_id in (7, 42, 99)
    ]
    assert [example.size for example in dataset] == [(10, 10), (12, 16), (8, 14)]
    image_7, image_42, image_99 = dataset
    assert [(a.class_index, a.box) for a in image_42.annotations] == [
        (2, (3.0, 2.0, 11.0, 7.0)),
        (0, (0.5, 6.25, 4.5, 11.25)),
    ]
    assert [(a.class_index, a.box) for a in image_7.annotations] == [(1, (1.0, 1.0, 6.0, 7.0))]
    assert dataset.pair_classes(image_42) == [0, 2]
    assert dataset.pair_classes(image_99) == []  # no annotation: nothing to explain
    # The crowd region's RLE decodes to exactly the mask the test encoded.
    assert np.array_equal(dataset.class_mask(image_42, 2, (12, 16)).numpy(), written["rle_mask"])
    # A polygon on integer corners covers the pixels of its half-open box.
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[1:7, 1:6] = True
    assert torch.equal(dataset.class_mask(image_7, 1, (10, 10)), expected)
    assert read_image(image_42).shape == (3, 12, 16)


def test_coco_without_pycocotools_names_the_extra(tmp_path, monkeypatch):
    write_coco(tmp_path)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match=r"captum-normgrad\[coco\]"):
        COCODataset(tmp_path, "val2014")


def test_image_folder_labels_by_sorted_folder(tmp_path):
    for name, count in (("zebra", 2), ("ant", 1)):
        (tmp_path / name).mkdir()
        for index in range(count):
            Image.new("RGB", (6, 4)).save(tmp_path / name / f"{index}.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["ant", "zebra"]
    assert [(e.image_id, e.label) for e in dataset] == [
        ("ant/0", 0),
        ("zebra/0", 1),
        ("zebra/1", 1),
    ]
    assert dataset.pair_classes(dataset[2]) == [1]
    assert not dataset.has_ground_truth


def test_open_dataset_by_kind_and_path(tmp_path):
    root = write_voc(tmp_path / "VOC2007")
    assert [e.image_id for e in open_dataset(f"voc:{root}")] == list(VOC_IMAGES)
    with pytest.raises(ValueError, match="KIND one of voc, coco, folder"):
        open_dataset(f"pascal:{root}")
