"""Spearman and SSIM against independent references; the model-randomisation check; selectivity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_state import assert_model_unchanged, model_snapshot
from scipy.ndimage import uniform_filter
from scipy.stats import spearmanr
from torch import nn

from captum_normgrad import LayerNormGrad
from captum_normgrad.metrics import (
    class_selectivity,
    map_ssim,
    model_randomization,
    randomizable_layers,
    spearman_correlation,
)


def test_spearman_matches_scipy_with_ties():
    first = torch.randint(0, 5, (4, 1, 6, 6)).double()  # many ties
    second = first + torch.randint(0, 3, (4, 1, 6, 6)).double()
    expected = [spearmanr(a.flatten(), b.flatten()).statistic for a, b in zip(first, second)]
    assert torch.allclose(spearman_correlation(first, second), torch.tensor(expected).double())


def test_spearman_hand_cases_and_constant_maps():
    ramp = torch.arange(16.0).view(1, 1, 4, 4)
    assert spearman_correlation(ramp, ramp**3).item() == pytest.approx(1.0)
    assert spearman_correlation(ramp, -ramp).item() == pytest.approx(-1.0)
    assert spearman_correlation(ramp, torch.ones_like(ramp)).item() == 0.0


def reference_ssim(first: np.ndarray, second: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) with a 7x7 uniform window, sample covariances, data range 1."""
    window, count = 7, 49
    correction = count / (count - 1)
    mean_a, mean_b = uniform_filter(first, window), uniform_filter(second, window)
    var_a = correction * (uniform_filter(first * first, window) - mean_a**2)
    var_b = correction * (uniform_filter(second * second, window) - mean_b**2)
    cov = correction * (uniform_filter(first * second, window) - mean_a * mean_b)
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / (
        (mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(ssim[3:-3, 3:-3].mean())


def normalised(maps: torch.Tensor) -> np.ndarray:
    low, high = maps.min(), maps.max()
    return ((maps - low) / (high - low)).double().numpy()


def test_ssim_matches_an_independent_float64_reference_after_min_max_normalisation():
    first = torch.rand(3, 1, 16, 16)
    second = first + 0.3 * torch.rand(3, 1, 16, 16)
    values = map_ssim(first, second * 5 + 2)  # scale and offset do not matter
    for index in range(3):
        expected = reference_ssim(normalised(first[index, 0]), normalised(second[index, 0]))
        assert values[index].item() == pytest.approx(expected, abs=1e-6)
    assert map_ssim(first, first).tolist() == pytest.approx([1.0] * 3)


def test_similarity_refuses_bad_inputs():
    with pytest.raises(ValueError, match="cannot be compared"):
        spearman_correlation(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 5, 5))
    with pytest.raises(ValueError, match="NaN"):
        spearman_correlation(torch.rand(2, 1, 4, 4), torch.full((2, 1, 4, 4), torch.nan))
    with pytest.raises(ValueError, match="at least 7x7"):
        map_ssim(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4))


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.relu2(self.conv2(self.relu1(self.conv1(images))))
        return self.fc(self.pool(features).flatten(1))


def input_itself(model: nn.Module):
    """A 'method' that ignores the model: the input's channel sum."""
    return lambda inputs, target=None: inputs.sum(dim=1, keepdim=True)


def test_a_map_independent_of_the_weights_stays_at_correlation_one():
    model = SmallNet().eval()
    images = torch.randn(3, 3, 12, 12)
    result = model_randomization(model, input_itself, images)
    assert result.layers == ["fc", "conv2", "conv1"]
    for values in (result.spearman, result.spearman_abs, result.ssim, result.ssim_abs):
        assert values.shape == (3, 3)
        assert torch.allclose(values, torch.ones_like(values), atol=1e-6)


def test_a_map_that_depends_on_the_weights_falls_and_the_model_is_untouched():
    model = SmallNet().eval()
    images = torch.randn(4, 3, 12, 12)
    before = model_snapshot(model)
    result = model_randomization(model, lambda m: LayerNormGrad(m, m.conv2), images)
    assert_model_unchanged(model, before)
    assert result.layers == ["fc", "conv2", "conv1"]
    # Fully randomised: far from the original map.
    assert result.spearman[-1].mean() < 0.5
    assert result.ssim[-1].mean() < 0.5
    assert (result.spearman[-1] < 1 - 1e-3).all()


def test_independent_randomisation_touches_only_the_named_layer_of_a_copy():
    model = SmallNet().eval()
    images = torch.randn(2, 3, 12, 12)

    def conv1_activation(m: nn.Module):
        return lambda inputs, target=None: m.conv1(inputs).abs().sum(dim=1, keepdim=True)

    independent = model_randomization(
        model, conv1_activation, images, layers=["fc", "conv1"], cascading=False
    )
    assert torch.allclose(independent.spearman[0], torch.ones(2))  # fc alone: conv1 unchanged
    assert (independent.spearman[1] < 0.99).all()  # conv1 re-initialised
    cascading = model_randomization(model, conv1_activation, images, layers=["fc", "conv1"])
    # The first step randomises the same layer with the same seed in both modes.
    assert torch.equal(cascading.spearman[0], independent.spearman[0])
    assert torch.equal(cascading.spearman[1], independent.spearman[1])


def test_target_none_is_the_original_models_prediction_at_every_step():
    model = SmallNet().eval()
    images = torch.randn(3, 3, 12, 12)
    seen = []

    def recording(m: nn.Module):
        def method(inputs, target=None):
            seen.append(target)
            return inputs.sum(dim=1, keepdim=True)

        return method

    model_randomization(model, recording, images, layers=["fc", "conv2"])
    expected = model(images).argmax(dim=1)
    assert len(seen) == 3 and all(torch.equal(target, expected) for target in seen)


def test_randomizable_layers_are_the_parameter_owners_top_first():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten())
    assert randomizable_layers(model) == ["1", "0"]


def test_sanity_check_refuses_bad_requests():
    model = SmallNet().eval()
    images = torch.randn(2, 3, 12, 12)
    with pytest.raises(ValueError, match="no such layers"):
        model_randomization(model, input_itself, images, layers=["conv9"])
    with pytest.raises(ValueError, match="no parameters"):
        model_randomization(model, input_itself, images, layers=["relu1"])
    with pytest.raises(ValueError, match="2 maps"):
        model_randomization(model, lambda m: LayerNormGrad(m, [m.conv1, m.conv2]), images)


def test_class_selectivity_is_the_rank_correlation_of_the_two_maps():
    maps = torch.arange(16.0).view(1, 1, 4, 4)
    assert class_selectivity(maps, maps * 2).item() == pytest.approx(1.0)
    assert class_selectivity(maps, maps.flip(-1).flip(-2)).item() == pytest.approx(-1.0)
    model = SmallNet().eval()
    images = torch.randn(2, 3, 12, 12)
    normgrad = LayerNormGrad(model, model.conv2)
    first = normgrad.attribute(images, target=0, loss="output")
    second = normgrad.attribute(images, target=1, loss="output")
    expected = [spearmanr(a.flatten(), b.flatten()).statistic for a, b in zip(first, second)]
    assert class_selectivity(first, second).tolist() == pytest.approx(expected, abs=1e-6)
