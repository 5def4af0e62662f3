"""One front door (issue 20): every method validates inputs, targets, the forward's output, the grad
mode and the layer's layout through the same code, before any pass, so the same bad input gets the
same exception and message from each, and nothing that one method refuses is answered with zeros,
a map over the wrong axis or an internal error by another.

The methods are the five ``LayerAttribution`` classes (order 1 and the adversarial map in every
batch mode) and the differentiable maps of ``training/``; the monitor shares the layout step.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from model_state import assert_model_unchanged, model_snapshot
from tiny_models import bn_cnn
from torch import Tensor, nn
from transformer_models import activation_and_gradient, grid_of, last_dim_norm, tiny_vit

from captum_normgrad import (
    LayerNormGrad,
    LayerNormGradAdversarial,
    LayerNormGradConv,
    LayerNormGradOrder1,
    LayerNormGradSelective,
)
from captum_normgrad.training import (
    DifferentiableGradCam,
    DifferentiableNormGrad,
    NormGradMonitor,
)

ORDER1 = (LayerNormGradOrder1, LayerNormGradAdversarial)
MODES = ("auto", "loop", "factored", "vmap")
# What batch_mode="factored" answers when the traced graph holds an operation off its allowlist.
FACTORED_REFUSAL = "batch_mode='factored' cannot run this model"


def _tiny() -> nn.Module:
    """Convolutions, eval-mode BatchNorm and a linear head: every batch mode runs it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    return model.double().eval()


def _images(batch: int = 2) -> Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, 5, 5, dtype=torch.float64)


def _callers(model: nn.Module, layer: nn.Module) -> dict[str, Callable[..., object]]:
    """Every method, as ``call(inputs, target, **kwargs) -> map``."""
    callers: dict[str, Callable[..., object]] = {}
    for method in (LayerNormGrad, LayerNormGradSelective, LayerNormGradConv):
        callers[method.__name__] = lambda x, t, method=method, **kw: method(model, layer).attribute(
            x, target=t, **kw
        )
    for method in ORDER1:
        for mode in MODES:
            callers[f"{method.__name__}[{mode}]"] = lambda x, t, method=method, mode=mode, **kw: (
                method(model, layer).attribute(x, target=t, batch_mode=mode, **kw)
            )
    for method in (DifferentiableNormGrad, DifferentiableGradCam):
        callers[method.__name__] = lambda x, t, method=method, **kw: (
            method(model, layer)(x, classes=t, **kw).maps
        )
    return callers


def _outcome(call: Callable[[], object]) -> tuple[type, str]:
    try:
        call()
    except (ValueError, TypeError, RuntimeError) as error:
        return type(error), str(error)
    return type(None), "no error"


BAD_CALLS = {
    "inputs None": (lambda x: None, lambda x: [0, 1], "inputs is None"),
    "inputs a list": (lambda x: x.tolist(), lambda x: [0, 1], "inputs must be a tensor"),
    "inputs a NumPy array": (lambda x: x.numpy(), lambda x: [0, 1], "inputs must be a tensor"),
    "inputs with NaN": (
        lambda x: x.index_put((torch.tensor(0),), torch.tensor(float("nan"), dtype=x.dtype)),
        lambda x: [0, 1],
        "input 0 contains NaN",
    ),
    "target a class name": (lambda x: x, lambda x: "tabby", "target must be"),
    "target out of range": (lambda x: x, lambda x: 7, "target class 7 is out of range"),
    "target too long": (lambda x: x, lambda x: [0, 1, 2], "target has 3 entries"),
    "target of shape (N, 1)": (
        lambda x: x,
        lambda x: torch.tensor([[0], [1]]),
        "target has shape (2, 1)",
    ),
    "target of floats": (lambda x: x, lambda x: torch.rand(2), "target must hold integer"),
}


@pytest.mark.parametrize("bad", list(BAD_CALLS))
def test_the_same_bad_input_gets_the_same_error_from_every_method(bad):
    make_inputs, make_target, expected = BAD_CALLS[bad]
    model = _tiny()
    before = model_snapshot(model)
    images = _images()
    outcomes = {
        name: _outcome(lambda call=call: call(make_inputs(images), make_target(images)))
        for name, call in _callers(model, model[3]).items()
    }
    kinds = {kind for kind, _ in outcomes.values()}
    messages = {message for _, message in outcomes.values()}
    assert len(kinds) == 1 and len(messages) == 1, outcomes
    assert expected in messages.pop()
    assert_model_unchanged(model, before)


def test_inference_mode_is_refused_by_every_method_never_answered_with_zeros():
    model = _tiny()
    images = _images()
    with torch.inference_mode():
        outcomes = {
            name: _outcome(lambda call=call: call(images, [0, 1]))
            for name, call in _callers(model, model[3]).items()
        }
    assert {kind for kind, _ in outcomes.values()} == {RuntimeError}, outcomes
    assert all("torch.inference_mode()" in message for _, message in outcomes.values()), outcomes


def test_no_grad_gives_the_maps_of_grad_mode_at_every_order():
    model = _tiny()
    images = _images()
    for name, call in _callers(model, model[3]).items():
        if name.startswith("Differentiable"):
            continue
        expected = call(images, [0, 1])
        with torch.no_grad():
            torch.testing.assert_close(call(images, [0, 1]), expected, rtol=1e-12, atol=0)


class _Wrapped(nn.Module):
    """The tiny model behind a forward that returns something other than a tensor."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.net = _tiny()
        self.how = how

    def forward(self, x: Tensor) -> object:
        logits = self.net(x)
        if self.how == "tuple":
            return logits, logits.detach()
        if self.how == "dict":
            return {"scores": logits}  # no "out": which entry is explained is not known
        if self.how == "segmenter dict":  # torchvision's segmenters: explained from "out"
            return {"out": logits, "aux": 2 * logits}
        return SimpleNamespace(logits=logits, hidden_states=None)  # a Hugging Face ModelOutput


@pytest.mark.parametrize("how", ["tuple", "dict"])
def test_a_forward_returning_a_tuple_or_dict_is_refused_alike_by_every_method(how):
    model = _Wrapped(how)
    before = model_snapshot(model)
    outcomes = {
        name: _outcome(lambda call=call: call(_images(), [0, 1]))
        for name, call in _callers(model, model.net[3]).items()
    }
    assert {kind for kind, _ in outcomes.values()} == {ValueError}, outcomes
    # batch_mode="factored" reads the traced graph first and may refuse what it finds there
    messages = {m for name, (_, m) in outcomes.items() if FACTORED_REFUSAL not in m}
    assert len(messages) == 1, outcomes
    assert f"returned a {how}" in messages.pop()
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("how", ["logits", "segmenter dict"])
def test_an_output_with_logits_is_explained_from_its_logits_at_every_order(how):
    wrapped = _Wrapped(how)
    bare = wrapped.net
    images = _images()
    for name, call in _callers(wrapped, wrapped.net[3]).items():
        expected = _callers(bare, bare[3])[name](images, [0, 1])
        if name.endswith("[factored]") and how == "logits":  # fx traces a dict, not any object
            with pytest.raises(ValueError, match=FACTORED_REFUSAL):
                call(images, [0, 1])
            continue
        torch.testing.assert_close(call(images, [0, 1]), expected, rtol=1e-10, atol=0)


class _SideBranch(nn.Module):
    """``side`` runs on the input, but nothing it computes reaches the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Conv2d(3, 4, 3, padding=1)
        self.side = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        self.side(x)
        return self.head(self.main(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("at_input", [False, True])
def test_a_layer_whose_output_never_reaches_the_loss_is_refused_by_every_method(at_input):
    model = _SideBranch().double()
    outcomes = {}
    for name, call in _callers(model, model.side).items():
        if at_input and name in (
            "LayerNormGradConv",
            "DifferentiableNormGrad",
            "DifferentiableGradCam",
        ):
            continue  # maps at the convolution's input already / output maps only
        if name.startswith("Differentiable"):
            outcomes[name] = _outcome(lambda call=call: call(_images(), [0, 1]))
        else:
            outcomes[name] = _outcome(
                lambda call=call: call(_images(), [0, 1], attribute_to_layer_input=at_input)
            )
    assert {kind for kind, _ in outcomes.values()} == {RuntimeError}, outcomes
    assert all("'side'" in m and "does not reach" in m for _, m in outcomes.values()), outcomes


def test_argument_errors_come_before_the_models_own_refusals():
    """A wrong-length target on a model whose train-mode BatchNorm cannot take one example of
    1x1 activations is reported as the target's error, by order 0 and by order 1 alike."""
    model = bn_cnn().double().train()
    images = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    for name, call in _callers(model, model[0]).items():
        kind, message = _outcome(lambda call=call: call(images, [0, 1, 2]))
        assert kind is ValueError and "target has 3 entries" in message, (name, message)


def test_order1_under_autocast_computes_the_float32_map():
    """The finite differences of order 1 cannot be resolved in bfloat16: the passes run in the
    inputs' precision with autocast off, and the map equals the one computed without autocast."""
    model = _tiny().float()
    images = _images().float()
    for method in ORDER1:
        for mode in ("loop", "factored"):
            expected = method(model, model[3]).attribute(images, target=[0, 1], batch_mode=mode)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mapped = method(model, model[3]).attribute(images, target=[0, 1], batch_mode=mode)
            assert mapped.dtype == torch.float32
            torch.testing.assert_close(mapped, expected, rtol=1e-5, atol=1e-8)


def test_order0_under_autocast_is_the_map_of_the_autocast_model():
    """Order 0 explains the model as it runs: under autocast, from its bfloat16 activations."""
    model = _tiny().float()
    images = _images().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mapped = LayerNormGrad(model, model[3]).attribute(images, target=[0, 1])
        activation, gradient = activation_and_gradient(
            model, model[3], images, torch.tensor([0, 1])
        )
    expected = activation.float().norm(dim=1, keepdim=True) * gradient.float().norm(
        dim=1, keepdim=True
    )
    torch.testing.assert_close(mapped.float(), expected, rtol=2e-2, atol=1e-6)


class _AssignsInForward(nn.Module):
    """A forward that rebinds buffers (an EMA, a step counter) and plain attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _tiny()
        self.register_buffer("ema", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.calls = 0
        self.last_mean = None

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        self.ema = 0.9 * self.ema + 0.1 * logits.detach().mean(dim=0)
        self.steps = self.steps + 1
        self.calls += 1
        self.last_mean = logits.mean()
        return logits


@pytest.mark.parametrize("train", [False, True])
def test_a_forward_that_assigns_attributes_leaves_the_model_unchanged(train):
    """Every method, every batch mode (the factored mode traces the forward with torch.fx, which
    once left a Proxy in the module). The differentiable maps are left out: their forward IS the
    training step's, whose state changes are the user's to keep."""
    model = _AssignsInForward().train(train)
    model.net.eval()  # BatchNorm on running statistics, so the factored mode gets to its trace
    before = model_snapshot(model)
    attributes = dict(vars(model))
    for name, call in _callers(model, model.net[3]).items():
        if name.startswith("Differentiable"):
            continue
        kind, message = _outcome(lambda call=call: call(_images(), [0, 1]))
        # the forward's `.detach()` is off the factored mode's allowlist; everything else runs
        assert kind is type(None) or ("factored" in name and FACTORED_REFUSAL in message), message
        assert_model_unchanged(model, before)
        assert vars(model).keys() == attributes.keys(), name
        assert model.calls == 0 and model.last_mean is None, name
        for module in model.modules():
            for value in [*module._buffers.values(), *module._parameters.values()]:
                assert type(value) in (Tensor, nn.Parameter), (name, type(value))
                assert not value._backward_hooks, name


def test_the_differentiable_maps_lay_out_a_vit_token_layer_as_layer_normgrad_does():
    """``(N, 1 + h*w, C)`` tokens: norms over channels on the patch grid, never over tokens."""
    model = tiny_vit()
    layer = model.encoder.layers[0]
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([1, 3])
    activation, gradient = activation_and_gradient(model, layer, images, labels)
    grid_activation, grid_gradient = grid_of(activation, 1, 4, 4), grid_of(gradient, 1, 4, 4)
    expected_normgrad = last_dim_norm(grid_activation) * last_dim_norm(grid_gradient)
    forward = DifferentiableNormGrad(model, layer)(images, classes=labels)
    torch.testing.assert_close(forward.maps, expected_normgrad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(
        LayerNormGrad(model, layer).attribute(images, target=labels), expected_normgrad.detach()
    )
    # Grad-CAM of the class score on the grid: ReLU(sum_k mean_u(dy/dA_k) A_k)
    score_activation, score_gradient = _score_gradient(model, layer, images, labels)
    channels_first = grid_of(score_activation, 1, 4, 4).permute(0, 3, 1, 2)
    weights = grid_of(score_gradient, 1, 4, 4).permute(0, 3, 1, 2).mean(dim=(2, 3), keepdim=True)
    expected_gradcam = torch.relu((weights * channels_first).sum(dim=1, keepdim=True))
    gradcam = DifferentiableGradCam(model, layer)(images, classes=labels).maps
    torch.testing.assert_close(gradcam, expected_gradcam, rtol=1e-10, atol=1e-14)


def _score_gradient(model, layer, images, labels):
    captured = {}
    handle = layer.register_forward_hook(lambda m, a, out: captured.setdefault("x", out))
    try:
        outputs = model(images)
        score = outputs.gather(1, labels[:, None]).sum()
        (gradient,) = torch.autograd.grad(score, captured["x"])
    finally:
        handle.remove()
    return captured["x"].detach(), gradient


def test_the_monitor_refuses_what_layer_normgrad_refuses_at_a_layout_it_cannot_know():
    """A custom token model (no registry knows it): the same refusal from the method and the
    monitor, naming the layer."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 6)
            self.norm = nn.LayerNorm(6)
            self.head = nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.norm(self.embed(x)).mean(dim=1))

    model = Tokens().double()
    tokens = torch.randn(2, 5, 4, dtype=torch.float64)
    _, method_message = _outcome(
        lambda: LayerNormGrad(model, model.norm).attribute(tokens, target=0)
    )

    def monitored() -> None:
        with NormGradMonitor(model, [model.norm], loss_reduction="sum"):
            F.cross_entropy(model(tokens), torch.tensor([0, 0]), reduction="sum").backward()

    _, monitor_message = _outcome(monitored)
    assert "'norm'" in method_message and method_message == monitor_message


def test_gradcam_reference_is_captum():
    """The Grad-CAM reference above is Captum's on a channels-first layer (sanity of the test)."""
    model = _tiny()
    images = _images()
    labels = torch.tensor([0, 2])
    activation, gradient = _score_gradient(model, model[3], images, labels)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    expected = torch.relu((weights * activation).sum(dim=1, keepdim=True))
    captum = LayerGradCam(model, model[3]).attribute(images, target=labels, relu_attributions=True)
    torch.testing.assert_close(expected, captum)
