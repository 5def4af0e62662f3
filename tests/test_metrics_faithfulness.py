"""Deletion / insertion curves and AUC, average drop and increase in confidence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_model_unchanged, model_snapshot
from torch import nn

from captum_normgrad.metrics import (
    area_under_curve,
    confidence_drop,
    confidence_increase,
    deletion_auc,
    deletion_curve,
    explanation_scores,
    insertion_auc,
    insertion_curve,
    substrate_images,
)


class RegionSum(nn.Module):
    """Two logits: ``sign * (sum of channel 0 over a region)`` and a constant 0."""

    def __init__(self, region: torch.Tensor, sign: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("region", region.double())
        self.sign = sign
        self.calls: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.shape[0])
        region_sum = (images[:, 0] * self.region).sum(dim=(1, 2))
        return torch.stack([self.sign * region_sum, torch.zeros_like(region_sum)], dim=1)


def top_row_region() -> torch.Tensor:
    region = torch.zeros(4, 4)
    region[0] = 1
    return region


def ramp(first_pixels: list[int], size: int = 4) -> torch.Tensor:
    """A (1, 1, size, size) map ranking ``first_pixels`` (raster indices) first, in that order."""
    values = torch.zeros(size * size, dtype=torch.float64)
    for rank, pixel in enumerate(first_pixels):
        values[pixel] = size * size - rank
    return values.view(1, 1, size, size)


def test_deletion_curve_and_auc_of_the_region_sum_are_known_in_advance():
    model = RegionSum(top_row_region())
    images = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    good = ramp([0, 1, 2, 3])  # the region first
    bad = ramp(list(range(4, 16)))  # the region last
    good_curve = deletion_curve(model, images, good, 0, n_steps=4, score="output")
    bad_curve = deletion_curve(model, images, bad, 0, n_steps=4, score="output")
    assert good_curve.tolist() == [[4.0, 0.0, 0.0, 0.0, 0.0]]
    assert bad_curve.tolist() == [[4.0, 4.0, 4.0, 4.0, 0.0]]
    # trapezoid with dx = 1/4: (4/2 + 0 + 0 + 0 + 0/2) / 4 and (4/2 + 4 + 4 + 4 + 0/2) / 4
    assert deletion_auc(model, images, good, 0, n_steps=4, score="output").item() == 0.5
    assert deletion_auc(model, images, bad, 0, n_steps=4, score="output").item() == 3.5


def test_insertion_curve_of_the_region_sum_with_zeros_substrate():
    model = RegionSum(top_row_region())
    images = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    good = ramp([3, 2, 1, 0])
    curve = insertion_curve(model, images, good, 0, n_steps=4, substrate="zeros", score="output")
    assert curve.tolist() == [[0.0, 4.0, 4.0, 4.0, 4.0]]
    assert (
        insertion_auc(model, images, good, 0, n_steps=4, substrate="zeros", score="output").item()
        == 3.5
    )


def test_steps_that_do_not_divide_the_pixels_change_floor_k_times_pixels_over_steps():
    # 16 pixels in 3 steps: 0, 5, 10, 16 pixels changed. Region = pixels 0..4 (the first five).
    region = torch.zeros(16)
    region[:5] = 1
    model = RegionSum(region.view(4, 4))
    images = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    curve = deletion_curve(model, images, ramp(list(range(16))), 0, n_steps=3, score="output")
    assert curve.tolist() == [[5.0, 0.0, 0.0, 0.0]]
    reverse = ramp(list(range(15, -1, -1)))
    curve = deletion_curve(model, images, reverse, 0, n_steps=3, score="output")
    assert curve.tolist() == [[5.0, 5.0, 5.0, 0.0]]


def test_probability_score_is_the_softmax_of_the_target():
    model = RegionSum(top_row_region())
    images = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    curve = deletion_curve(model, images, ramp([0, 1, 2, 3]), 0, n_steps=4)
    sigmoid = 1 / (1 + math.exp(-4.0))  # softmax of [4, 0] at class 0
    assert curve[0].tolist() == pytest.approx([sigmoid, 0.5, 0.5, 0.5, 0.5], abs=1e-12)
    other = deletion_curve(model, images, ramp([0, 1, 2, 3]), 1, n_steps=4)
    assert other[0, 0].item() == pytest.approx(1 - sigmoid, abs=1e-12)


def test_substrates_zeros_mean_and_blur():
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    assert torch.equal(substrate_images(images, "zeros"), torch.zeros_like(images))
    mean = substrate_images(images, "mean")
    assert torch.allclose(mean[1, 2], images[1, 2].mean().expand(16, 16))
    # RISE's blur: a separable Gaussian, kernel 11, sigma 5, reflect padding (float64 reference).
    offsets = torch.arange(11, dtype=torch.float64) - 5
    kernel_1d = torch.exp(-(offsets**2) / (2 * 5.0**2))
    kernel_1d /= kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(3, 1, 11, 11)
    padded = F.pad(images, (5, 5, 5, 5), mode="reflect")
    expected = F.conv2d(padded, kernel, groups=3)
    assert torch.allclose(substrate_images(images, "blur"), expected, atol=1e-6)
    baseline = torch.full((3, 1, 1), 0.5, dtype=torch.float64)
    assert torch.equal(substrate_images(images, baseline), baseline.expand_as(images))


def test_mean_substrate_deletion_ends_at_the_image_mean():
    model = RegionSum(top_row_region())
    images = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    curve = deletion_curve(
        model, images, torch.rand(1, 1, 4, 4), 0, n_steps=2, substrate="mean", score="output"
    )
    assert curve[0, 0].item() == pytest.approx(images[0, 0, 0].sum().item(), abs=1e-12)
    assert curve[0, -1].item() == pytest.approx(4 * images.mean().item(), abs=1e-12)


def slow_deletion_curve(model, images, maps, target, n_steps, substrate):
    """The naive reference: one example and one step at a time, in float64."""
    maps = F.interpolate(maps.double(), images.shape[-2:], mode="bilinear", align_corners=False)
    curves = []
    for index in range(images.shape[0]):
        image, saliency = images[index].double(), maps[index, 0].flatten()
        order = torch.argsort(saliency, descending=True, stable=True)
        pixels = saliency.numel()
        curve = []
        for step in range(n_steps + 1):
            removed = order[: step * pixels // n_steps]
            flat = image.clone().flatten(1)
            flat[:, removed] = substrate[index].double().flatten(1)[:, removed]
            probabilities = model(flat.view(1, *image.shape)).softmax(dim=1)
            curve.append(probabilities[0, target[index]].item())
        curves.append(curve)
    curves = torch.tensor(curves, dtype=torch.float64)
    return curves, (curves[:, 1:] + curves[:, :-1]).sum(dim=1) / (2 * n_steps)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_batched_curves_of_layer_maps_match_a_slow_per_step_loop(chunk_size):
    model = (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 5),
        )
        .double()
        .eval()
    )
    images = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    layer_maps = torch.rand(3, 1, 3, 3, dtype=torch.float64)  # upsampled to 12x12 first
    target = torch.tensor([0, 3, 4])
    expected_curves, expected_auc = slow_deletion_curve(
        model, images, layer_maps, target, 9, torch.zeros_like(images)
    )
    curves = deletion_curve(model, images, layer_maps, target, n_steps=9, chunk_size=chunk_size)
    assert torch.allclose(curves, expected_curves, atol=1e-12)
    auc = deletion_auc(model, images, layer_maps, target, n_steps=9, chunk_size=chunk_size)
    assert torch.allclose(auc, expected_auc, atol=1e-12)
    blurred = substrate_images(images, "blur")
    # insertion = the reference loop started from the blur, "removing" towards the image
    insertion = insertion_curve(model, images, layer_maps, target, 9, chunk_size=chunk_size)
    expected_insertion, _ = slow_deletion_curve(model, blurred, layer_maps, target, 9, images)
    assert torch.allclose(insertion, expected_insertion, atol=1e-12)


def test_area_under_curve_is_the_trapezoid_rule():
    curves = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert area_under_curve(curves).tolist() == [0.5, 0.25]
    with pytest.raises(ValueError, match="n_steps"):
        area_under_curve(torch.ones(2, 1))


def test_chunking_makes_exactly_the_forward_passes_needed():
    model = RegionSum(top_row_region())
    images = torch.ones(5, 1, 4, 4, dtype=torch.float64)
    deletion_curve(model, images, torch.rand(5, 1, 4, 4), 0, n_steps=4, chunk_size=8)
    assert model.calls == [8, 8, 8, 1]  # 5 examples x 5 steps = 25 images
    model.calls.clear()
    deletion_curve(model, images, torch.rand(5, 1, 4, 4), None, n_steps=4, chunk_size=8)
    assert model.calls == [5, 8, 8, 8, 1]  # target=None: one pass for the top-1 prediction


def test_batch_invariance_and_target_none_uses_the_top_prediction():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    images = torch.randn(4, 3, 8, 8)
    maps = torch.rand(4, 1, 8, 8)
    batched = deletion_curve(model, images, maps, None, n_steps=5)
    alone = torch.cat(
        [deletion_curve(model, images[i : i + 1], maps[i : i + 1], None, 5) for i in range(4)]
    )
    assert torch.allclose(batched, alone, atol=1e-6)
    top = model(images).argmax(dim=1)
    assert torch.allclose(batched, deletion_curve(model, images, maps, top, n_steps=5))


def test_the_model_is_left_untouched_even_in_train_mode():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).train()
    images = torch.randn(2, 3, 8, 8)
    before = model_snapshot(model)
    insertion_auc(model, images, torch.rand(2, 1, 8, 8), 1, n_steps=4)
    confidence_drop(*explanation_scores(model, images, torch.rand(2, 1, 8, 8), 1))
    assert_model_unchanged(model, before)


def test_average_drop_and_increase_of_the_region_sum():
    model = RegionSum(top_row_region())
    images = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    maps = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    maps[0, 0, 0] = 0.5  # the region kept at half, after min-max: max 1 elsewhere, min 0
    maps[0, 0, 3, 3] = 1.0
    original, explained = explanation_scores(model, images, maps, 0)
    y, o = 1 / (1 + math.exp(-4.0)), 1 / (1 + math.exp(-2.0))
    assert original.item() == pytest.approx(y, abs=1e-12)
    assert explained.item() == pytest.approx(o, abs=1e-12)
    assert confidence_drop(original, explained).item() == pytest.approx((y - o) / y, abs=1e-12)
    assert confidence_increase(original, explained).item() == 0.0
    # A negative-evidence region removed by the map: the confidence rises, the drop is 0.
    negative = RegionSum(top_row_region(), sign=-1.0)
    hides_region = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    hides_region[0, 0, 0] = 0
    original, explained = explanation_scores(negative, images, hides_region, 0)
    assert confidence_increase(original, explained).item() == 1.0
    assert confidence_drop(original, explained).item() == 0.0


def test_a_constant_map_keeps_nothing():
    model = RegionSum(top_row_region())
    images = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    original, explained = explanation_scores(model, images, torch.ones(1, 1, 2, 2), 0)
    assert explained.item() == 0.5  # softmax of [0, 0]


def test_drop_refuses_non_positive_scores():
    with pytest.raises(ValueError, match="positive"):
        confidence_drop(torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize(
    ("maps", "message"),
    [
        (torch.rand(3, 1, 4, 4), "3 examples but the images hold 2"),
        (torch.rand(2, 3, 4, 4), "one channel|shape \\(N, 1, h, w\\)"),
        (torch.full((2, 1, 4, 4), torch.nan), "NaN"),
        ([torch.rand(2, 1, 4, 4)] * 2, "one map per layer"),
    ],
)
def test_bad_maps_are_refused(maps, message):
    model = RegionSum(top_row_region())
    images = torch.ones(2, 1, 4, 4)
    with pytest.raises((ValueError, TypeError), match=message):
        deletion_auc(model, images, maps, 0, n_steps=4)
    with pytest.raises((ValueError, TypeError), match=message):
        explanation_scores(model, images, maps, 0)


def test_bad_arguments_are_refused():
    model = RegionSum(top_row_region())
    images, maps = torch.ones(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="n_steps"):
        deletion_auc(model, images, maps, 0, n_steps=17)
    with pytest.raises(ValueError, match="substrate"):
        deletion_auc(model, images, maps, 0, n_steps=4, substrate="noise")
    with pytest.raises(ValueError, match="blur substrate"):
        insertion_auc(model, images, maps, 0, n_steps=4)  # 4x4 is too small for an 11x11 blur
    with pytest.raises(ValueError, match="out of range"):
        deletion_auc(model, images, maps, 2, n_steps=4)
    with pytest.raises(ValueError, match="3 entries"):
        deletion_auc(model, images, maps, [0, 1, 0], n_steps=4)
    with pytest.raises(ValueError, match="chunk_size"):
        deletion_auc(model, images, maps, 0, n_steps=4, chunk_size=0)
    with pytest.raises(ValueError, match="NaN"):
        deletion_auc(model, images * torch.nan, maps, 0, n_steps=4)
    with pytest.raises(ValueError, match="does not broadcast"):
        deletion_auc(model, images, maps, 0, n_steps=4, substrate=torch.zeros(3, 4, 4))
