"""TorchRay's pointing-game protocol against a hand-computed example.

Three 64x64 images, resized to 16x16 for the model (a factor 4). The method puts a one-hot peak on
input pixel (2, 2) for a cat and (12, 12) for a dog; upsampled bilinearly to the original image the
maximum lies at (9, 9) and (49, 49) (the first of four equal values). Cat boxes start 14, 20 and 15
original pixels to the right of (9, 9): hit, miss (it would be a hit at 5 input pixels), miss (the
distance must be strictly below 15).
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from evaluation_datasets import voc_classifier, write_voc

from captum_normgrad.evaluation import (
    VOC_CLASSES,
    Preprocessing,
    Region,
    VOCDataset,
    evaluate_dataset,
    maps_at_original_size,
)

CAT, DOG = VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")
FULL_HEIGHT = (1, 64)
IMAGES = {  # VOC boxes: 1-based inclusive (xmin, ymin, xmax, ymax)
    "a": ((64, 64), [("cat", (24, 1, 40, 64), False), ("dog", (1, 1, 10, 10), False)]),
    "b": ((64, 64), [("cat", (30, 1, 40, 64), False), ("person", (40, 40, 60, 60), True)]),
    "c": ((64, 64), [("cat", (25, 1, 40, 64), False), ("dog", (45, 45, 55, 55), False)]),
}
# hits: cat a 1, b 0, c 0 (1/3); dog a 0, c 1 (1/2); TorchRay's accuracy (1/3 + 1/2) / 2.
EXPECTED_HITS = {("a", "cat"): 1.0, ("a", "dog"): 0.0, ("b", "cat"): 0.0, ("c", "cat"): 0.0,
                 ("c", "dog"): 1.0}  # fmt: skip


def peak_method(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    maps = torch.zeros(len(inputs), 1, *inputs.shape[-2:])
    for index, class_index in enumerate(target.tolist()):
        position = 2 if class_index == CAT else 12
        maps[index, 0, position, position] = 1.0
    return maps


def _flags_file(path, rows):
    lines = []
    for image_id, ones in rows.items():
        flags = ["1" if index in ones else "0" for index in range(len(VOC_CLASSES))]
        lines.append("\t".join([image_id, *flags]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pointing_game_protocol_by_hand(tmp_path, one_thread):
    dataset = VOCDataset(write_voc(tmp_path / "voc", IMAGES))
    # EBP difficult subset: a's cat (not its dog), not b's cat; c has no row, so all its pairs.
    flags = _flags_file(tmp_path / "difficult.txt", {"a": {CAT}, "b": set()})
    table = evaluate_dataset(
        voc_classifier(),
        dataset,
        {"peak": peak_method},
        tmp_path / "out",
        ["pointing_game"],
        preprocessing=Preprocessing(resize=16),
        difficult_flags=flags,
        progress=False,
    )
    with open(tmp_path / "out" / "per_example.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # b's person is only a difficult box: no pair. The rows are sorted by key.
    assert [(row["image"], row["class"]) for row in rows] == list(EXPECTED_HITS)
    assert {(r["image"], r["class"]): float(r["pointing_game"]) for r in rows} == EXPECTED_HITS
    difficult = [float(row["pointing_game_difficult"]) for row in rows]
    assert difficult[0] == 1.0 and difficult[3:] == [0.0, 1.0]
    assert math.isnan(difficult[1]) and math.isnan(difficult[2])
    (summary,) = table.rows
    assert summary["examples"] == 5
    assert summary["pointing_game"] == pytest.approx((1 / 3 + 1 / 2) / 2)  # not 2/5 pooled
    assert summary["pointing_game_difficult"] == pytest.approx((1 / 2 + 1) / 2)


def test_a_cropped_map_peaks_inside_the_region_the_model_saw():
    image = torch.rand(3, 40, 80)
    inputs, region = Preprocessing(resize=20, crop=20)(image)
    assert inputs.shape == (1, 3, 20, 20)
    assert region == Region(0, 20, 40, 40)  # the centre 40x40 of the original
    maps = torch.zeros(1, 1, 20, 20)  # a constant map: every pixel ties
    placed = maps_at_original_size(maps, region, (40, 80))
    peak = int(placed.flatten().argmax())
    assert divmod(peak, 80) == (0, 20)  # the region's first pixel, not the image's


def test_a_folder_of_classes_has_no_ground_truth_to_point_at(tmp_path):
    from PIL import Image

    from captum_normgrad.evaluation import ImageFolderDataset

    (tmp_path / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "0.png")
    with pytest.raises(ValueError, match="has no boxes or masks for pointing_game"):
        evaluate_dataset(voc_classifier(), ImageFolderDataset(tmp_path), {"peak": peak_method},
                         tmp_path / "out", ["pointing_game"])  # fmt: skip
