"""``batch_mode="factored"`` against the per-example loop (itself checked bit for bit against the
formula's naive float64 loop): the same maps on every model it accepts, a refusal naming the reason
on every model it cannot run, and the model left as it was."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_normgrad import LayerNormGrad, LayerNormGradAdversarial, LayerNormGradOrder1

TOLERANCE = {"rtol": 1e-9, "atol": 1e-13}


def _randomised_batchnorm(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from the identity, so BatchNorm matters."""
    generator = torch.Generator().manual_seed(11)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    return model


def _same_maps(method, inputs, **kwargs) -> None:
    loop = method.attribute(inputs, batch_mode="loop", **kwargs)
    factored = method.attribute(inputs, batch_mode="factored", **kwargs)
    loop, factored = (m if isinstance(m, list) else [m] for m in (loop, factored))
    for a, b in zip(factored, loop):
        assert a.shape == b.shape
        assert b.abs().max() > 0  # a map, not a vacuous zero
        torch.testing.assert_close(a, b, **TOLERANCE)


class Residual(nn.Module):
    """Strided, dilated, grouped and 1x1 convolutions, BatchNorm, an in-place residual sum, a
    concatenation along channels and a linear head with bias."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(16, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(self.stem(x)))
        y = self.grouped(x)
        y += x
        z = torch.cat([y, self.depthwise(x)], dim=1)
        z = self.pointwise(torch.relu(z))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))


class Tokens(nn.Module):
    """Linear layers on tokens ``(N, T, F)`` and a Conv1d, with an extra per-example scale."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv1d(3, 6, 3, padding=1)
        self.mix = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).transpose(1, 2)  # (N, T, 6)
        tokens = torch.relu(self.mix(tokens))
        pooled = self.norm(tokens.mean(1)) * scale
        return self.head(pooled)


def _residual() -> Residual:
    torch.manual_seed(0)
    return _randomised_batchnorm(Residual()).double().eval()


def test_factored_equals_loop_on_convolutions_of_every_kind():
    model = _residual()
    images = torch.randn(5, 3, 12, 12, dtype=torch.float64)
    layers = [model.norm, model.grouped, model.pointwise]
    order1 = LayerNormGradOrder1(model, layers)
    _same_maps(order1, images, target=[0, 1, 2, 3, 0])
    _same_maps(order1, images, target=2, chunk_size=2)  # chunks 1, 2, 2
    _same_maps(order1, images, target=None, attribute_to_layer_input=True, eps=0.01)
    _same_maps(order1, images, target=torch.tensor([3, 2, 1, 0, 1]), hvp="exact", eps=0.01)
    _same_maps(LayerNormGradAdversarial(model, model.depthwise), images, target=1, eps=0.01)


def test_factored_equals_loop_on_tokens_with_extra_arguments_and_a_callable_loss():
    torch.manual_seed(1)
    model = _randomised_batchnorm(Tokens()).double().eval()
    signals = torch.randn(4, 3, 7, dtype=torch.float64)
    scale = torch.rand(4, 1, dtype=torch.float64) + 0.5
    order1 = LayerNormGradOrder1(model, model.embed)
    _same_maps(order1, signals, target=[0, 1, 2, 0], additional_forward_args=(scale,))
    _same_maps(order1, signals, target=1, additional_forward_args=(torch.tensor(2.0).double(),))

    def squared_error(outputs, target):
        return (outputs - target).square().sum(1)

    wanted = torch.randn(4, 3, dtype=torch.float64)
    _same_maps(order1, signals, target=wanted, loss=squared_error, additional_forward_args=(scale,))


@pytest.mark.parametrize("at_input", [False, True], ids=["outputs", "inputs"])
def test_exact_product_equals_the_loops_on_every_model(at_input):
    """The exact product is a backward through pass 1's backward, from the rules' inner products
    (and pass 1 runs the convolutions and BatchNorm in a twice-differentiable form of its own).
    At the first layer's input nothing below has parameters: pass 1's backward starts there."""
    residual = _residual()
    images = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    layers = [residual.stem, residual.grouped, residual.pointwise]
    for layer in layers:
        _same_maps(
            LayerNormGradOrder1(residual, layer),
            images,
            target=[0, 1, 2],
            hvp="exact",
            eps=0.01,
            attribute_to_layer_input=at_input,
        )
    torch.manual_seed(1)
    tokens = _randomised_batchnorm(Tokens()).double().eval()
    signals = torch.randn(4, 3, 7, dtype=torch.float64)
    scale = torch.rand(4, 1, dtype=torch.float64) + 0.5
    for layer in (tokens.embed, tokens.norm, tokens.head):
        _same_maps(
            LayerNormGradAdversarial(tokens, layer),
            signals,
            target=[0, 1, 2, 0],
            additional_forward_args=(scale,),
            hvp="exact",
            eps=0.01,
            attribute_to_layer_input=at_input,
        )


def test_factored_equals_loop_on_torchvision_resnet_with_partly_frozen_layers():
    torch.manual_seed(2)
    model = _randomised_batchnorm(torchvision.models.resnet18(num_classes=5)).double().eval()
    model.layer1.requires_grad_(False)  # frozen layers stay out of theta
    model.fc.weight.requires_grad_(False)  # a trainable bias alone
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    _same_maps(
        LayerNormGradOrder1(model, [model.layer2, model.layer3[0].conv1]),
        images,
        target=[1, 2, 3],
        eps=0.01,
    )


def test_auto_takes_the_factored_passes_on_small_models():
    model = _residual()
    images = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    order1 = LayerNormGradOrder1(model, model.grouped)
    auto = order1.attribute(images, target=[0, 1, 2])
    assert torch.equal(auto, order1.attribute(images, target=[0, 1, 2], batch_mode="factored"))


class UsesWeightDirectly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x), 1), 1)
        return x @ self.fc.weight.T


class MixesTheBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        x = x - x.mean(0)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: not traceable
            x = x * 2
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x), 1), 1))


class RunsTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = self.conv(torch.relu(self.conv(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)
        self.b.weight = self.conv.weight
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)[:, :2]
        return self.fc(torch.tanh(self.b(torch.tanh(self.conv(x)))))


class KeywordInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(input=x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DividesByBatchSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x) / x.size(0)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _small_cnn(norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


def _refused_models():
    torch.manual_seed(3)
    train_norm = _small_cnn(nn.BatchNorm2d(4)).train()
    layer_norm = _small_cnn(nn.GroupNorm(2, 4))
    hooked = _small_cnn(nn.Identity())
    hooked[0].register_forward_hook(lambda module, args, output: None)
    return [
        ("training mode", train_norm, train_norm[0]),
        ("reads 'fc.weight' directly", UsesWeightDirectly(), None),
        ("calls mean", MixesTheBatch(), None),
        ("cannot trace", Branches(), None),
        ("runs 2 times", RunsTwice(), None),
        ("GroupNorm", layer_norm, layer_norm[0]),
        ("hooks of its own", hooked, hooked[0]),
        ("tied weights", Tied(), None),
        ("keyword arguments", KeywordInput(), None),
        ("size of its input", DividesByBatchSize(), None),
    ]


@pytest.mark.parametrize("reason, model, layer", _refused_models(), ids=lambda v: str(v)[:20])
def test_refused_with_the_reason_and_auto_gives_the_loop(reason, model, layer):
    model = model.double()
    layer = layer if layer is not None else model.fc if reason == "runs 2 times" else model.conv
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order1 = LayerNormGradOrder1(model, layer)
    if reason == "training mode":  # BatchNorm in training mode cannot see one example alone
        images = torch.randn(3, 3, 9, 9, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=rf"batch_mode='factored' cannot run this model: .*{reason}"
    ):
        order1.attribute(images, target=[0, 1, 0], batch_mode="factored")
    auto = order1.attribute(images, target=[0, 1, 0])
    assert torch.equal(auto, order1.attribute(images, target=[0, 1, 0], batch_mode="loop"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_forward_func_other_than_the_forward_is_refused():
    model = _residual()

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def logits(self, x):
            return self.inner(x)

    wrapper = Wrapper()
    order1 = LayerNormGradOrder1(wrapper.logits, model.grouped)
    with pytest.raises(ValueError, match="not the model itself"):
        order1.attribute(
            torch.randn(2, 3, 12, 12, dtype=torch.float64), target=0, batch_mode="factored"
        )


@pytest.mark.parametrize("hvp", ["finite_difference", "exact"])
def test_the_model_is_left_as_it_was(hvp):
    model = _residual()
    parameters = {name: p for name, p in model.named_parameters()}
    saved = {name: t.clone() for name, t in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in parameters.items()}
    LayerNormGradOrder1(model, [model.grouped, model.head]).attribute(
        torch.randn(3, 3, 12, 12, dtype=torch.float64),
        target=[0, 1, 2],
        batch_mode="factored",
        hvp=hvp,
    )
    assert {name: p for name, p in model.named_parameters()} == parameters  # same objects
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_order_one_tends_to_order_zero_as_eps_vanishes():
    """A wrong sign or scale of the update would not vanish with eps."""
    model = _residual()
    images = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    order0 = LayerNormGrad(model, model.grouped).attribute(images, target=[0, 1, 2])
    order1 = LayerNormGradOrder1(model, model.grouped)
    far = order1.attribute(images, target=[0, 1, 2], batch_mode="factored", eps=0.5)
    near = order1.attribute(images, target=[0, 1, 2], batch_mode="factored", eps=1e-7)
    assert (far - order0).abs().max() > 1e-3 * order0.abs().max()
    torch.testing.assert_close(near, order0, rtol=1e-5, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(
    channels=st.integers(1, 6),
    kernel=st.sampled_from([1, 2, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    grouped=st.booleans(),
    bias=st.booleans(),
    norm=st.booleans(),
    head_bias=st.booleans(),
    attribute_first=st.booleans(),
    at_input=st.booleans(),
    hvp=st.sampled_from(["finite_difference", "exact"]),
    seed=st.integers(0, 10_000),
)
def test_random_convolutional_nets(
    channels,
    kernel,
    stride,
    padding,
    dilation,
    grouped,
    bias,
    norm,
    head_bias,
    attribute_first,
    at_input,
    hvp,
    seed,
):
    torch.manual_seed(seed)
    groups = 2 if grouped else 1
    first = nn.Conv2d(2, 2 * channels, kernel, stride, padding, dilation, groups=groups, bias=bias)
    second = nn.Conv2d(2 * channels, 4, 3, padding=1)
    layers = [first, nn.BatchNorm2d(2 * channels) if norm else nn.Identity(), nn.ReLU(), second]
    model = nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=head_bias)
    )
    model = _randomised_batchnorm(model).double().eval()
    images = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    layer = first if attribute_first else second
    _same_maps(
        LayerNormGradOrder1(model, layer),
        images,
        target=[0, 1, 2],
        eps=0.01,
        hvp=hvp,
        attribute_to_layer_input=at_input,
    )


class _Body(nn.Module):
    def __init__(self, function) -> None:
        super().__init__()
        self.function = function

    def forward(self, y):
        return self.function(y)


class _MixedBy(nn.Module):
    """conv -> ``body`` (an operation under test) -> linear head on the flattened map."""

    def __init__(self, function) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.body = _Body(function)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.body(torch.relu(self.conv(x))))


_MIXING = {
    "roll over the batch": lambda y: torch.roll(y, 1, 0).flatten(1),
    "reshape to (-1, 144)": lambda y: y.reshape(-1, 144),
    "flatten from dim 0": lambda y: y.flatten(0).view(y.size(0), -1),
    "a sum over everything": lambda y: (y * y.sum()).flatten(1),
    "a max over everything": lambda y: (y - y.max()).flatten(1),
    "a flip of the batch": lambda y: y.flip(0).flatten(1),
    "an einsum across examples": lambda y: torch.einsum("bchw,dchw->bchw", y, y).flatten(1),
    "a sort over the batch": lambda y: torch.sort(y, 0)[0].flatten(1),
    "a threshold at the batch mean": lambda y: torch.where(y > y.mean(), y, 0 * y).flatten(1),
    "a slice of the batch": lambda y: torch.cat([y[1:], y[:1]]).flatten(1),
}


@pytest.mark.parametrize("operation", list(_MIXING))
def test_operations_that_mix_the_examples_are_refused_and_auto_gives_the_loop(operation):
    """Deny by default: every one of these would give each example the others' updates."""
    torch.manual_seed(0)
    model = _MixedBy(_MIXING[operation]).double().eval()
    images = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    order1 = LayerNormGradOrder1(model, model.conv)
    with pytest.raises(ValueError, match="batch_mode='factored' cannot run this model"):
        order1.attribute(images, target=[0, 1, 2], batch_mode="factored")
    auto = order1.attribute(images, target=[0, 1, 2])
    assert torch.equal(auto, order1.attribute(images, target=[0, 1, 2], batch_mode="loop"))


def test_batch_first_flattening_by_size_runs_factored():
    """``y.view(y.size(0), -1)`` keeps the examples apart: it runs, with the loop's maps."""
    torch.manual_seed(0)
    model = _MixedBy(lambda y: y.view(y.size(0), -1)).double().eval()
    _same_maps(
        LayerNormGradOrder1(model, model.conv),
        torch.randn(3, 3, 6, 6, dtype=torch.float64),
        target=[0, 1, 2],
        eps=0.05,
    )


@pytest.mark.parametrize(
    "build, layer, at_input, hvp",
    [
        # depthwise and pointwise convolutions, ReLU6, inverted residuals
        (
            lambda: torchvision.models.mobilenet_v2(num_classes=3),
            "features.9.conv.1",
            True,
            "exact",
        ),
        # bottlenecks: 1x1 convolutions as matrix products, a strided 1x1 downsample
        (
            lambda: torchvision.models.resnet50(num_classes=3),
            "layer2.0",
            False,
            "finite_difference",
        ),
        (lambda: torchvision.models.resnet50(num_classes=3), "layer1.2.conv2", False, "exact"),
    ],
    ids=["mobilenet_v2-input-exact", "resnet50-fd", "resnet50-exact"],
)
def test_factored_equals_loop_on_torchvision_architectures(build, layer, at_input, hvp):
    torch.manual_seed(4)
    model = _randomised_batchnorm(build()).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _same_maps(
        LayerNormGradAdversarial(model, model.get_submodule(layer)),
        images,
        target=[0, 2],
        eps=0.01,
        hvp=hvp,
        attribute_to_layer_input=at_input,
    )
