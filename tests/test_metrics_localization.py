"""Pointing game and box localization, on maps whose maxima and components are known."""

from __future__ import annotations

import math

import pytest
import torch

from captum_normgrad.metrics import (
    localization_accuracy,
    localization_iou,
    map_maxima,
    pointing_game,
    pointing_game_accuracy,
    saliency_boxes,
)


def peak_map(row: int, col: int, size: int = 10) -> torch.Tensor:
    maps = torch.zeros(1, 1, size, size)
    maps[0, 0, row, col] = 1.0
    return maps


def test_a_mask_pixel_at_distance_three_is_a_miss_at_tolerance_three_and_a_hit_at_four():
    mask = torch.zeros(1, 10, 10, dtype=torch.bool)
    mask[0, 2, 5] = True  # three columns right of the peak
    maps = peak_map(2, 2)
    assert pointing_game(maps, masks=mask, tolerance=3).item() == 0.0  # 9 < 9 is false
    assert pointing_game(maps, masks=mask, tolerance=4).item() == 1.0


def test_a_box_edge_at_distance_three_decides_by_one_pixel_of_tolerance():
    box = [torch.tensor([5, 0, 7, 10])]  # covers columns 5 and 6
    maps = peak_map(2, 2)
    assert pointing_game(maps, boxes=box, image_size=(10, 10), tolerance=3).item() == 0.0
    assert pointing_game(maps, boxes=box, image_size=(10, 10), tolerance=4).item() == 1.0


def test_boxes_are_half_open():
    maps = peak_map(0, 2)
    size = (10, 10)
    # tolerance 1: only the peak pixel itself counts.
    assert (
        pointing_game(maps, boxes=torch.tensor([[0, 0, 2, 1]]), image_size=size, tolerance=1).item()
        == 0.0
    )
    assert (
        pointing_game(maps, boxes=torch.tensor([[0, 0, 3, 1]]), image_size=size, tolerance=1).item()
        == 1.0
    )


def test_several_boxes_per_example_any_one_counts():
    boxes = [torch.tensor([[8, 8, 10, 10], [0, 0, 3, 3]])]
    assert pointing_game(peak_map(1, 1), boxes=boxes, image_size=(10, 10), tolerance=1) == 1.0


def test_layer_maps_are_upsampled_before_the_maximum_is_taken():
    maps = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])
    # bilinear, align_corners=False, 2 -> 8: rows and cols 6 and 7 sample the source at >= 1,
    # so they all hold the maximum exactly; the first in raster order is (6, 6).
    assert map_maxima(maps, (8, 8)).tolist() == [[6, 6]]
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 6, 6] = True
    assert pointing_game(maps, masks=mask, tolerance=1).item() == 1.0


def test_examples_without_ground_truth_are_skipped_as_nan():
    maps = torch.cat([peak_map(1, 1), peak_map(5, 5), peak_map(9, 9)])
    boxes = [torch.tensor([0, 0, 3, 3]), None, torch.tensor([0, 0, 3, 3])]
    hits = pointing_game(maps, boxes=boxes, image_size=(10, 10), tolerance=2)
    assert hits[0].item() == 1.0 and math.isnan(hits[1].item()) and hits[2].item() == 0.0
    masks = [torch.ones(10, 10), None, torch.ones(10, 10)]
    assert pointing_game(maps, masks=masks)[[0, 2]].tolist() == [1.0, 1.0]


def test_accuracy_is_averaged_per_class_and_skips_nan():
    hits = torch.tensor([1.0, 0.0, 0.0, 1.0, torch.nan])
    classes = torch.tensor([0, 0, 0, 1, 1])
    # class 0: 1/3, class 1: 1/1 (the NaN is skipped) -> mean 2/3; a plain mean would say 1/2.
    assert pointing_game_accuracy(hits, classes).item() == pytest.approx(2 / 3)
    assert pointing_game_accuracy(hits).item() == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="no example"):
        pointing_game_accuracy(torch.tensor([torch.nan]))
    with pytest.raises(ValueError, match="classes of shape"):
        pointing_game_accuracy(hits, [0, 1])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"boxes": [torch.tensor([0, 0, 11, 5])], "image_size": (10, 10)}, ValueError, "outside"),
        ({"boxes": [torch.tensor([-1, 0, 3, 5])], "image_size": (10, 10)}, ValueError, "outside"),
        ({"boxes": [torch.tensor([3, 0, 3, 5])], "image_size": (10, 10)}, ValueError, "empty box"),
        ({"boxes": [torch.zeros(0, 4)], "image_size": (10, 10)}, ValueError, "no boxes"),
        ({"boxes": [torch.tensor([0, 0, 3, 3])]}, ValueError, "image_size"),
        ({"masks": torch.zeros(1, 10, 10)}, ValueError, "mask is empty"),
        ({"masks": torch.full((1, 10, 10), 2.0)}, ValueError, "only 0 and 1"),
        ({"masks": torch.ones(2, 10, 10)}, ValueError, "2 entries for 1 maps"),
        ({"masks": [torch.ones(10, 10)], "image_size": (8, 8)}, ValueError, "differs"),
        ({}, ValueError, "exactly one"),
        ({"masks": torch.ones(1, 10, 10), "tolerance": 0}, ValueError, "tolerance"),
        ({"masks": [None]}, ValueError, "no example has a mask"),
    ],
)
def test_bad_ground_truth_is_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        pointing_game(peak_map(1, 1), **kwargs)


def test_non_finite_maps_are_refused():
    maps = peak_map(1, 1)
    maps[0, 0, 0, 0] = torch.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        pointing_game(maps, masks=torch.ones(1, 10, 10))
    with pytest.raises(ValueError, match="NaN or infinite"):
        localization_iou(maps, [torch.tensor([0, 0, 3, 3])], (10, 10))


def two_blobs() -> torch.Tensor:
    """Background 0.1; a 3x3 blob of 1.0 at rows/cols 1-3; a 2x2 blob of 0.9 at rows/cols 6-7."""
    maps = torch.full((1, 1, 10, 10), 0.1)
    maps[0, 0, 1:4, 1:4] = 1.0
    maps[0, 0, 6:8, 6:8] = 0.9
    return maps


def test_the_box_of_the_largest_component_and_its_iou():
    assert saliency_boxes(two_blobs(), (10, 10)).tolist() == [[1, 1, 4, 4]]
    exact = localization_iou(two_blobs(), [torch.tensor([1, 1, 4, 4])], (10, 10))
    assert exact.item() == 1.0
    # ground truth cols 2-3, rows 1-3: intersection 6, union 9 + 6 - 6 = 9
    partial = localization_iou(two_blobs(), torch.tensor([[2, 1, 4, 4]]), (10, 10))
    assert partial.item() == pytest.approx(6 / 9)
    # the best of several ground-truth boxes counts
    several = [torch.tensor([[6, 6, 8, 8], [2, 1, 4, 4]])]
    assert localization_iou(two_blobs(), several, (10, 10)).item() == pytest.approx(6 / 9)


def test_components_are_eight_connected():
    maps = torch.zeros(1, 1, 10, 10)
    for i in range(5):
        maps[0, 0, i, i] = 1.0  # a diagonal of 5 pixels: one component only if 8-connected
    maps[0, 0, 7:9, 7:9] = 1.0  # a 2x2 block of 4
    assert saliency_boxes(maps, (10, 10)).tolist() == [[0, 0, 5, 5]]


def test_the_threshold_is_strict_and_relative_to_the_normalised_maximum():
    maps = torch.zeros(1, 1, 10, 10)
    maps[0, 0, 0, 0] = 1.0
    maps[0, 0, 0, 1] = 0.2
    assert saliency_boxes(maps, (10, 10), threshold=0.2).tolist() == [[0, 0, 1, 1]]
    assert saliency_boxes(maps, (10, 10), threshold=0.15).tolist() == [[0, 0, 2, 1]]
    shifted = maps * 3 + 7  # min-max normalisation: the same boxes
    assert saliency_boxes(shifted, (10, 10), threshold=0.15).tolist() == [[0, 0, 2, 1]]


def test_layer_maps_are_upsampled_and_constant_maps_localise_nothing():
    maps = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    box = saliency_boxes(maps, (8, 8), threshold=0.5)
    upsampled = torch.nn.functional.interpolate(maps, (8, 8), mode="bilinear")
    rows, cols = torch.nonzero(upsampled[0, 0] > 0.5, as_tuple=True)
    assert box.tolist() == [
        [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]
    ]
    constant = torch.ones(1, 1, 4, 4)
    assert saliency_boxes(constant, (8, 8)).tolist() == [[0, 0, 0, 0]]
    assert localization_iou(constant, [torch.tensor([0, 0, 8, 8])], (8, 8)).item() == 0.0


def test_localization_accuracy_counts_iou_at_least_one_half_and_skips_nan():
    ious = torch.tensor([1.0, 0.5, 0.4, torch.nan])
    assert localization_accuracy(ious).item() == pytest.approx(2 / 3)
    maps = torch.cat([two_blobs(), two_blobs()])
    ious = localization_iou(maps, [torch.tensor([1, 1, 4, 4]), None], (10, 10))
    assert ious[0].item() == 1.0 and math.isnan(ious[1].item())


def test_localization_refuses_bad_inputs():
    with pytest.raises(ValueError, match="outside"):
        localization_iou(two_blobs(), [torch.tensor([0, 0, 12, 3])], (10, 10))
    with pytest.raises(ValueError, match="2 entries for 1 maps"):
        localization_iou(two_blobs(), [torch.tensor([0, 0, 3, 3])] * 2, (10, 10))
    with pytest.raises(ValueError, match="threshold"):
        saliency_boxes(two_blobs(), (10, 10), threshold=1.0)
    with pytest.raises(ValueError, match="image_size"):
        saliency_boxes(two_blobs(), (10,))
