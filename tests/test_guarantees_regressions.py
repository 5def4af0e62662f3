"""Issue 9, items 1-5, 11 and 12: one regression test per item (each failed before its fix).

Model state (item 1), gradients that cannot reach a layer (2), differentiable maps under no_grad
(3), overflow (4), ``inputs=None`` (5), argument errors (11) and Captum's wrappers (12), over all five
methods where the item applies to them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import LayerAttribution, NoiseTunnel
from model_state import assert_model_unchanged, model_snapshot
from tiny_models import bn_cnn
from torch import nn
from torch.utils.checkpoint import checkpoint

from captum_normgrad import (
    LayerNormGrad,
    LayerNormGradAdversarial,
    LayerNormGradConv,
    LayerNormGradOrder1,
    LayerNormGradSelective,
)

ORDER0 = [LayerNormGrad, LayerNormGradSelective, LayerNormGradConv]
ALL_METHODS = [*ORDER0, LayerNormGradOrder1, LayerNormGradAdversarial]


def call(method, model, layer, inputs, **kwargs):
    """One call of any of the five methods (order 1 in its loop mode, which every model supports)."""
    if method in (LayerNormGradOrder1, LayerNormGradAdversarial):
        kwargs.setdefault("batch_mode", "loop")
    return method(model, layer).attribute(inputs, **kwargs)


class ReassignsBuffers(nn.Module):
    """A forward that rebinds its buffers to new tensors (running mean, step counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = bn_cnn()
        self.register_buffer("ema", torch.zeros(3))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        features = self.body[:5](x)
        self.ema = 0.9 * self.ema + 0.1 * x.mean(dim=(0, 2, 3))
        self.steps = self.steps + 1
        self.extra = torch.ones(1)  # a plain attribute: not module state
        return self.body[5:](features)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("raises", [False, True])
def test_item1_reassigned_buffers_are_restored_by_identity_and_value(method, raises, one_thread):
    model = ReassignsBuffers().train()
    model.body[7].requires_grad_(True)
    ema, steps = model.ema, model.steps
    before = model_snapshot(model)
    images = torch.randn(2, 3, 8, 8)
    if raises:
        with pytest.raises(ValueError, match="out of range"):
            call(method, model, model.body[3], images, target=9)
    else:
        call(method, model, model.body[3], images, target=[0, 2])
    assert model.ema is ema and model.steps is steps
    assert_model_unchanged(model, before)


def test_item1_rebound_parameter_and_added_buffer_are_undone():
    class Rebinds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            self.head.weight = nn.Parameter(self.head.weight.detach() * 2)
            self.register_buffer("added", torch.ones(1))
            return self.head(self.conv(x).mean(dim=(2, 3)))

    model = Rebinds()
    weight = model.head.weight
    before = model_snapshot(model)
    LayerNormGrad(model, model.conv).attribute(torch.randn(2, 3, 6, 6), target=1)
    assert model.head.weight is weight
    assert "added" not in dict(model.named_buffers())
    assert_model_unchanged(model, before)


class CheckpointedNet(nn.Module):
    """A conv block run under activation checkpointing (or not), then a classifier."""

    def __init__(self, mode: str | None) -> None:
        super().__init__()
        self.mode = mode
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))

    def forward(self, x):
        if self.mode == "reentrant":
            x = checkpoint(self.block, x, use_reentrant=True)
        elif self.mode == "non_reentrant":
            x = checkpoint(self.block, x, use_reentrant=False)
        elif self.mode == "no_grad":
            with torch.no_grad():
                x = self.block(x)
        else:
            x = self.block(x)
        return self.head(x)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("method", ORDER0)
@pytest.mark.parametrize("mode", ["reentrant", "no_grad"])
def test_item2_layer_without_gradient_is_refused_not_zero(method, mode):
    model = CheckpointedNet(mode).double()
    before = model_snapshot(model)
    with pytest.raises(
        RuntimeError, match=r"layer 'block\.2' ran with gradient recording disabled"
    ):
        method(model, model.block[2]).attribute(torch.randn(2, 3, 6, 6).double(), target=1)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("method", ORDER0)
def test_item2_non_reentrant_checkpointing_gives_the_plain_map(method):
    plain = CheckpointedNet(None).double()
    checkpointed = CheckpointedNet("non_reentrant").double()
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    layers = lambda model: [model.block[0], model.block[2]]  # noqa: E731
    expected = method(plain, layers(plain)).attribute(images, target=[0, 1, 2])
    got = method(checkpointed, layers(checkpointed)).attribute(images, target=[0, 1, 2])
    for got_map, expected_map in zip(got, expected):
        assert expected_map.abs().sum() > 0
        torch.testing.assert_close(got_map, expected_map, rtol=1e-12, atol=1e-14)


def test_item2_memory_efficient_densenet_matches_the_plain_one(one_thread):
    plain = torchvision.models.densenet121(weights=None, num_classes=5).eval()
    efficient = torchvision.models.densenet121(
        weights=None, num_classes=5, memory_efficient=True
    ).eval()
    efficient.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    pick = lambda m: [m.features.denseblock2.denselayer3.conv1, m.features.transition2]  # noqa: E731
    expected = LayerNormGrad(plain, pick(plain)).attribute(images, target=[1, 3])
    got = LayerNormGrad(efficient, pick(efficient)).attribute(images, target=[1, 3])
    for got_map, expected_map in zip(got, expected):
        torch.testing.assert_close(got_map, expected_map, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ORDER0)
def test_item3_create_graph_keeps_the_graph_under_no_grad(method):
    model = bn_cnn().double().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        maps = method(model, model[3]).attribute(images, target=[0, 1], create_graph=True)
    assert maps.requires_grad
    expected = method(model, model[3]).attribute(images, target=[0, 1], create_graph=True)
    (got_grad,) = torch.autograd.grad(maps.sum(), model[0].weight)
    (expected_grad,) = torch.autograd.grad(expected.sum(), model[0].weight)
    torch.testing.assert_close(got_grad, expected_grad)


class HugeActivations(nn.Module):
    """A layer whose activations are ~1e19 (squares overflow float32), scaled back down after."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.huge = nn.Identity()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.huge(self.conv(x) * self.scale) / self.scale)


@pytest.mark.parametrize("method", [LayerNormGrad, LayerNormGradSelective])
def test_item4_huge_activations_give_the_float64_map(method):
    model = HugeActivations(1e19)
    images = torch.randn(2, 3, 5, 5)
    got = method(model, model.huge).attribute(images, target=[0, 2])
    expected = method(model.double(), model.huge).attribute(images.double(), target=[0, 2])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=0)


def test_item4_a_convolution_map_that_overflows_is_refused_by_layer_name():
    # The patches of `conv` hold ~1e20 values: their squares overflow float32.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 3, 7, 7))
    model[0].weight.data.mul_(1e20)
    model[1].weight.data.mul_(1e-20)
    before = model_snapshot(model)
    with pytest.raises(RuntimeError, match=r"map of layer '1' is not finite.*float64"):
        LayerNormGradConv(model, model[1]).attribute(torch.randn(2, 3, 7, 7), target=[0, 2])
    assert_model_unchanged(model, before)
    maps = LayerNormGradConv(model.double(), model[1]).attribute(
        torch.randn(2, 3, 7, 7, dtype=torch.float64), target=[0, 2]
    )
    assert torch.isfinite(maps).all() and maps.amax() > 1e18


@pytest.mark.parametrize("method", [LayerNormGradOrder1, LayerNormGradAdversarial])
def test_item4_an_exploding_inner_step_is_refused_by_layer_name(method, one_thread):
    model = bn_cnn().eval()
    before = model_snapshot(model)
    with pytest.raises(RuntimeError, match=r"map of layer '3' is not finite"):
        call(method, model, model[3], torch.randn(2, 3, 8, 8), target=[0, 2], eps=1e36)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        (None, ValueError, "inputs is None"),
        ([[0.0] * 8] * 8, TypeError, "inputs must be a tensor .* got a list"),
        (np.zeros((2, 3, 8, 8), dtype=np.float32), TypeError, "got a ndarray"),
        ((torch.zeros(2, 3, 8, 8), "x"), TypeError, r"inputs\[1\] is a str"),
        ((), ValueError, "inputs is an empty tuple"),
    ],
)
def test_items5_11_bad_inputs_are_named(method, inputs, error, message):
    model = bn_cnn()
    before = model_snapshot(model)
    with pytest.raises(error, match=message):
        call(method, model, model[3], inputs, target=0)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        ("tabby", TypeError, "target must be .*got str"),
        (["tabby", "cat"], TypeError, "target must be .*holding str"),
        (1.5, TypeError, "target must be .*got float"),
        (torch.tensor([0.0, 1.0]), ValueError, "target must hold integer class indices"),
    ],
)
def test_item11_bad_targets_for_cross_entropy_are_named(method, target, error, message):
    model = bn_cnn()
    with pytest.raises(error, match=message):
        call(method, model, model[3], torch.randn(2, 3, 8, 8), target=target)


@pytest.mark.parametrize("method", ORDER0)
@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("tabby", TypeError),
        ([0.0, 1.0], TypeError),
        (1.5, TypeError),
        (torch.tensor([0.0, 1.0]), ValueError),
        (torch.tensor([True, False]), ValueError),
    ],
)
def test_item11_bad_targets_for_the_output_convention_are_named(method, target, error):
    model = bn_cnn()
    with pytest.raises(error, match="^target must"):
        method(model, model[3]).attribute(torch.randn(2, 3, 8, 8), target=target, loss="output")


def noisy_copies(images: torch.Tensor, samples: int, stdev: float) -> torch.Tensor:
    """The noisy batch NoiseTunnel draws (same generator calls, same order)."""
    size = (images.shape[0] * samples, *images.shape[1:])
    noise = torch.normal(0, torch.tensor(stdev).repeat(size))
    return images.repeat_interleave(samples, dim=0) + noise


@pytest.mark.parametrize("method", ALL_METHODS)
def test_item12_noise_tunnel_equals_a_manual_loop(method, one_thread):
    model = bn_cnn().double().eval()
    layer = model[3]
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    samples, stdev = 3, 0.2
    extra = {"batch_mode": "loop"} if method in ALL_METHODS[3:] else {}
    for nt_type in ["smoothgrad", "smoothgrad_sq", "vargrad"]:
        torch.manual_seed(7)
        tunnel = NoiseTunnel(method(model, layer)).attribute(
            images, nt_type=nt_type, nt_samples=samples, stdevs=stdev, target=1, **extra
        )
        torch.manual_seed(7)
        maps = method(model, layer).attribute(
            noisy_copies(images, samples, stdev), target=1, **extra
        )
        maps = maps.unflatten(0, (2, samples))
        expected = {
            "smoothgrad": maps.mean(dim=1),
            "smoothgrad_sq": maps.square().mean(dim=1),
            "vargrad": maps.square().mean(dim=1) - maps.mean(dim=1).square(),
        }[nt_type]
        assert expected.abs().sum() > 0
        torch.testing.assert_close(tunnel, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_item12_captum_metrics_and_interpolate_compose(method, one_thread):
    from captum.metrics import infidelity, sensitivity_max

    from captum_normgrad.metrics.captum_adapter import input_shaped_explanation, to_input_shape

    model = bn_cnn().eval()
    images = torch.randn(2, 3, 8, 8)
    attribution = method(model, model[3])
    extra = {"batch_mode": "loop"} if method in ALL_METHODS[3:] else {}
    maps = attribution.attribute(images, target=[0, 1], **extra)
    upsampled = LayerAttribution.interpolate(maps, (8, 8), "bilinear")
    assert upsampled.shape == (2, 1, 8, 8) and torch.isfinite(upsampled).all()

    def perturb(inputs):
        noise = 0.1 * torch.randn_like(inputs)
        return noise, inputs - noise

    score = infidelity(model, perturb, images, to_input_shape(maps, images), target=[0, 1])
    assert score.shape == (2,) and torch.isfinite(score).all()
    explain = input_shaped_explanation(
        lambda x, target, **kwargs: attribution.attribute(x, target=target, **extra)
    )
    sensitivity = sensitivity_max(explain, images, target=torch.tensor([0, 1]), n_perturb_samples=2)
    assert sensitivity.shape == (2,) and torch.isfinite(sensitivity).all()
