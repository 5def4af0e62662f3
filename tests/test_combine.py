"""Combining maps from several layers: upsample, min-max normalise per example, product or sum."""

from __future__ import annotations

import pytest
import torch

from captum_normgrad import combine_layer_maps, normalize_per_example, upsample_maps


def test_normalize_per_example_by_hand():
    maps = torch.tensor([[[[1.0, 3.0], [5.0, 2.0]]], [[[4.0, 4.0], [4.0, 4.0]]]])
    expected = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(normalize_per_example(maps), expected)


def test_upsample_nearest_by_hand_and_identity_at_same_size():
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    up = upsample_maps(maps, (4, 4), mode="nearest")
    assert up[0, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert up[0, 0, 3].tolist() == [3.0, 3.0, 4.0, 4.0]
    assert upsample_maps(maps, 2) is maps
    bilinear = upsample_maps(maps, (4, 4))
    assert bilinear[0, 0, 0, 0] == 1.0 and bilinear[0, 0, 0, 1] == 1.25  # align_corners=False


def test_product_and_weighted_sum_by_hand():
    coarse = torch.tensor(
        [[[[0.0, 2.0]]]]
    )  # normalises to (0, 1), upsampled (nearest-like: 1x2 -> 1x2)
    fine = torch.tensor([[[[1.0, 3.0]]]])  # (0, 1) as well
    other = torch.tensor([[[[4.0, 2.0]]]])  # (1, 0)
    torch.testing.assert_close(
        combine_layer_maps([coarse, fine], (1, 2)), torch.tensor([[[[0.0, 1.0]]]])
    )
    torch.testing.assert_close(
        combine_layer_maps([coarse, other], (1, 2)), torch.tensor([[[[0.0, 0.0]]]])
    )
    torch.testing.assert_close(
        combine_layer_maps([coarse, other], (1, 2), how="sum", weights=[0.25, 0.75]),
        torch.tensor([[[[0.75, 0.25]]]]),
    )
    torch.testing.assert_close(
        combine_layer_maps([coarse, other], (1, 2), how="sum"), torch.tensor([[[[0.5, 0.5]]]])
    )


def test_layers_at_different_resolutions_meet_at_the_image_size():
    maps = [torch.rand(2, 1, 7, 7), torch.rand(2, 1, 14, 14), torch.rand(2, 1, 28, 28)]
    combined = combine_layer_maps(maps, (56, 56))
    assert combined.shape == (2, 1, 56, 56)
    assert combined.min() >= 0 and combined.max() <= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(maps=[]), "at least one"),
        (dict(maps=[torch.rand(2, 1, 2, 2), torch.rand(3, 1, 2, 2)]), "batch sizes"),
        (dict(maps=[torch.rand(1, 1, 2, 2)], how="max"), "how must be"),
        (dict(maps=[torch.rand(1, 1, 2, 2)], how="sum", weights=[1, 2]), "2 weights given for 1"),
        (dict(maps=[torch.rand(1, 1, 2, 2)], how="sum", weights=[-1.0]), "non-negative"),
        (dict(maps=[torch.rand(1, 1, 2, 2)], weights=[1.0]), "how='sum' only"),
    ],
)
def test_bad_combinations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        combine_layer_maps(size=(4, 4), **kwargs)
