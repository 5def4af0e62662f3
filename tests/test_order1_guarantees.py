"""Order 1 and the adversarial map keep DESIGN.md section 3: batch invariance, the model left exactly
as it was (also when a call raises), clear errors, and a fixed number of passes per example."""

from __future__ import annotations

import pytest
import torch
import torchvision
from model_state import assert_model_unchanged, model_snapshot
from tiny_models import bn_cnn
from torch import Tensor, nn

from captum_normgrad.order1 import LayerNormGradAdversarial, LayerNormGradOrder1

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("batch_mode", ["loop", "vmap"])
@pytest.mark.parametrize("method", [LayerNormGradOrder1, LayerNormGradAdversarial])
def test_batch_invariance(method, batch_mode):
    model = bn_cnn().eval()
    images = torch.randn(3, 3, 8, 8)
    labels = torch.tensor([0, 2, 1])
    attribution = method(model, [model[1], model[3]])
    together = attribution.attribute(images, target=labels, batch_mode=batch_mode)
    for index in range(3):
        alone = attribution.attribute(images[index : index + 1], target=labels[index : index + 1])
        for batch_map, single_map in zip(together, alone):
            torch.testing.assert_close(batch_map[index : index + 1], single_map)


def test_torchvision_resnet_loop_and_vmap_agree_and_leave_it_untouched():
    model = torchvision.models.resnet18(num_classes=5).eval()
    images = torch.randn(2, 3, 32, 32)
    before = model_snapshot(model)
    attribution = LayerNormGradOrder1(model, [model.layer2, model.layer3[0].conv1])
    loop = attribution.attribute(images, target=[1, 4], batch_mode="loop")
    vmapped = attribution.attribute(images, target=[1, 4], batch_mode="vmap")
    for a, b in zip(loop, vmapped):
        assert a.shape[:2] == (2, 1)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("batch_mode", ["loop", "vmap"])
def test_model_untouched_in_train_mode(batch_mode):
    model = bn_cnn().train()
    for parameter in model.parameters():  # existing .grad fields must survive too
        parameter.grad = torch.randn_like(parameter)
    before = model_snapshot(model)
    maps = LayerNormGradOrder1(model, model[3]).attribute(
        torch.randn(3, 3, 8, 8), target=[0, 1, 2], batch_mode=batch_mode
    )
    assert maps.shape == (3, 1, 4, 4) and torch.isfinite(maps).all()
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("batch_mode", ["loop", "vmap"])
def test_model_untouched_when_a_pass_raises(batch_mode):
    model = bn_cnn().train()
    before = model_snapshot(model)
    calls = []

    def failing_loss(outputs: Tensor, target: object) -> Tensor:
        calls.append(1)
        if len(calls) == 3:  # the probe and pass 1 went through; pass 2 fails mid-way
            raise RuntimeError("loss failed")
        return outputs.logsumexp(dim=1) - outputs[:, 0]

    with pytest.raises(RuntimeError, match="loss failed"):
        LayerNormGradOrder1(model, model[3]).attribute(
            torch.randn(2, 3, 8, 8), loss=failing_loss, batch_mode=batch_mode
        )
    assert_model_unchanged(model, before)


def test_works_under_no_grad():
    model = bn_cnn().eval()
    images = torch.randn(2, 3, 8, 8)
    attribution = LayerNormGradOrder1(model, model[3])
    expected = attribution.attribute(images, target=[0, 1])
    with torch.no_grad():
        torch.testing.assert_close(attribution.attribute(images, target=[0, 1]), expected)


def test_zero_gradient_gives_a_zero_map_not_nan():
    """h = h_scale / ||v|| with v = 0: the Hessian term is zero for any finite step."""
    model = bn_cnn().eval()

    def flat_loss(outputs: Tensor, target: object) -> Tensor:
        return 0.0 * outputs.sum(dim=1)

    for h_scale in (0.5, 1e6):
        maps = LayerNormGradOrder1(model, model[3]).attribute(
            torch.randn(2, 3, 8, 8), loss=flat_loss, h_scale=h_scale
        )
        assert torch.equal(maps, torch.zeros(2, 1, 4, 4))


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts the backward passes that reach the logits."""

    generate_vmap_rule = True
    backward_calls = 0

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        _CountBackward.backward_calls += 1
        return grad_output

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return tangent


class CountingNet(nn.Module):
    # On the class: the methods restore the model's own attributes after each call.
    forward_calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.body = bn_cnn()
        type(self).forward_calls = 0

    def forward(self, x: Tensor) -> Tensor:
        type(self).forward_calls += 1
        return _CountBackward.apply(self.body(x))


@pytest.mark.parametrize(
    ("hvp", "batch_mode", "forwards", "backwards"),
    [
        # 4 passes per example, the first one resolving the label ...
        ("finite_difference", "loop", 4 * 3, 4 * 3),
        # ... or 2 forwards and 3 backwards: pass 1's, pass 2's and the double backward through
        # pass 1's graph (the logits' backward runs again in it) ...
        ("exact", "loop", 2 * 3, 3 * 3),
        # ... or, after one forward of the batch that resolves the labels, 4 passes per vmapped
        # chunk, which runs every example of the chunk at once
        ("finite_difference", "vmap", 1 + 4, 4),
    ],
)
def test_passes_per_example(hvp, batch_mode, forwards, backwards):
    model = CountingNet().eval()
    _CountBackward.backward_calls = 0
    layers = [model.body[0], model.body[3], model.body[6]]  # more layers cost no more passes
    LayerNormGradOrder1(model, layers).attribute(
        torch.randn(3, 3, 8, 8), target=[0, 1, 2], hvp=hvp, batch_mode=batch_mode
    )
    assert (model.forward_calls, _CountBackward.backward_calls) == (forwards, backwards)


def test_clear_errors():
    model = bn_cnn().eval()
    images = torch.randn(2, 3, 8, 8)
    attribution = LayerNormGradOrder1(model, model[3])
    for bad in (0.0, -1e-3, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="eps"):
            attribution.attribute(images, eps=bad)
        with pytest.raises(ValueError, match="h_scale"):
            attribution.attribute(images, h_scale=bad)
    with pytest.raises(ValueError, match="loss='output'"):
        attribution.attribute(images, target=0, loss="output")
    with pytest.raises(ValueError, match="hvp"):
        attribution.attribute(images, hvp="forward")
    with pytest.raises(ValueError, match="batch_mode"):
        attribution.attribute(images, batch_mode="parallel")
    with pytest.raises(ValueError, match="chunk_size"):
        attribution.attribute(images, batch_mode="vmap", chunk_size=0)
    with pytest.raises(ValueError, match="out of range"):
        attribution.attribute(images, target=7)
    with pytest.raises(ValueError, match="NaN"):
        attribution.attribute(torch.full((1, 3, 8, 8), float("nan")))


def test_no_trainable_parameters():
    model = bn_cnn().eval().requires_grad_(False)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        LayerNormGradOrder1(model, model[3]).attribute(torch.randn(1, 3, 8, 8), target=0)
    assert_model_unchanged(model, before)


def test_non_logit_output_with_cross_entropy():
    model = nn.Sequential(nn.Conv2d(3, 1, 4), nn.Flatten(0))  # (N,): one score, no classes
    with pytest.raises(ValueError, match=r"cross-entropy needs \(N, num_classes\) logits"):
        LayerNormGradOrder1(model, model[0]).attribute(torch.randn(2, 3, 4, 4), target=1)


def test_dropout_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    with pytest.raises(ValueError, match=r"dropout module '1' is in training mode"):
        LayerNormGradOrder1(model, model[0]).attribute(torch.randn(2, 4), target=0)
    maps = LayerNormGradOrder1(model.eval(), model[0]).attribute(torch.randn(2, 4), target=0)
    assert maps.shape == (2, 1)


def test_forward_func_must_expose_its_parameters():
    model = bn_cnn()
    with pytest.raises(TypeError, match="nn.Module or a bound method"):
        LayerNormGradOrder1(lambda x: model(x), model[3])
    with pytest.raises(ValueError, match="not a submodule"):
        LayerNormGradOrder1(model, nn.Conv2d(3, 4, 1))


def test_layer_that_never_runs():
    model = CountingNet().eval()
    model.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(RuntimeError, match="'unused' did not run"):
        LayerNormGradOrder1(model, model.unused).attribute(torch.randn(1, 3, 8, 8), target=0)
