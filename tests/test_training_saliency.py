"""Differentiable saliency maps and the saliency-penalised loss of papers/002."""

from __future__ import annotations

import math

import pytest
import torch
from captum.attr import GuidedGradCam, LayerGradCam
from model_state import assert_model_unchanged, model_snapshot
from tiny_models import tiny_batch, tiny_cnn
from torch import nn

from captum_normgrad import LayerNormGrad
from captum_normgrad.training import (
    DifferentiableGradCam,
    DifferentiableGuidedGradCam,
    DifferentiableNormGrad,
    SaliencyPenalisedLoss,
    train_only,
)

METHODS = [DifferentiableGradCam, DifferentiableGuidedGradCam, DifferentiableNormGrad]


pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_model():
    """1x1 conv (weight 1) -> mean over the 2x2 map -> logits (+mean, -mean)."""
    model = nn.Sequential(
        nn.Conv2d(1, 1, 1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(1, 2, bias=False),
    ).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[3].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    return model


@pytest.mark.parametrize("inplace", [False, True])
def test_grad_cam_equals_captum(inplace):
    model = tiny_cnn(inplace)
    images, _ = tiny_batch()
    forward = DifferentiableGradCam(model, model[2])(images)
    assert torch.equal(forward.classes, model(images).argmax(dim=1))
    reference = LayerGradCam(model, model[2]).attribute(
        images, target=forward.classes, relu_attributions=True
    )
    torch.testing.assert_close(forward.maps, reference, rtol=1e-12, atol=1e-15)
    assert forward.maps.requires_grad


def test_guided_grad_cam_equals_captum():
    model = tiny_cnn()
    images, labels = tiny_batch()
    forward = DifferentiableGuidedGradCam(model, model[2])(images, classes=labels)
    reference = GuidedGradCam(model, model[2]).attribute(
        images, target=labels, interpolate_mode="bilinear"
    )
    assert forward.maps.shape == images.shape
    torch.testing.assert_close(forward.maps, reference, rtol=1e-12, atol=1e-15)


def test_normgrad_and_its_weight_gradient_equal_layer_normgrad():
    model = tiny_cnn()
    images, _ = tiny_batch()
    forward = DifferentiableNormGrad(model, model[2])(images)
    reference = LayerNormGrad(model, model[2]).attribute(
        images, target=forward.classes, create_graph=True
    )
    torch.testing.assert_close(forward.maps, reference, rtol=1e-12, atol=0)
    weights = list(model.parameters())
    ours = torch.autograd.grad(forward.maps.sum(), weights)
    theirs = torch.autograd.grad(reference.sum(), weights)
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def _hand_expected(lam, labels, confidence, right_weight=1.0):
    """Eq. 7 with the hand model: logits (5, -5), prediction 0, K = 2."""
    terms = []
    for label in labels:
        cross_entropy = math.log1p(math.exp(-10.0)) + (10.0 if label == 1 else 0.0)
        correct = label == 0
        wrong_penalty = 0.0 if correct else confidence
        right_penalty = max(1.0 - confidence, 0.0) if correct else 0.0
        terms.append(
            (1 - lam) * cross_entropy / 2
            + lam * confidence / 2
            + wrong_penalty
            + right_weight * right_penalty
        )
    return sum(terms) / len(terms)


@pytest.mark.parametrize("method", [DifferentiableGradCam, DifferentiableNormGrad])
def test_penalty_value_on_a_hand_checked_case(method):
    # The layer's activation is the image [[2, 4], [6, 8]] and the logits are (5, -5). Grad-CAM of
    # class 0 is A / 4 = [[.5, 1], [1.5, 2]]; NormGrad is A * sigmoid(-10) / 2. Normalised by the
    # maximum, both are [[.25, .5], [.75, 1]], mean m = 0.625.
    model = _hand_model()
    images = torch.tensor([[2.0, 4.0], [6.0, 8.0]], dtype=torch.float64).expand(2, 1, 2, 2)
    labels = torch.tensor([0, 1])  # right, then wrong
    terms = SaliencyPenalisedLoss(method(model, model[0]), lam=0.3)(images, labels)
    assert terms.predictions.tolist() == [0, 0]
    assert terms.correct.tolist() == [1.0, 0.0]
    torch.testing.assert_close(terms.confidence, torch.full((2,), 0.625, dtype=torch.float64))
    assert terms.wrong_penalty.tolist() == [0.0, 0.625]
    assert terms.right_penalty.tolist() == [0.375, 0.0]
    assert terms.loss.item() == pytest.approx(_hand_expected(0.3, [0, 1], 0.625), rel=1e-12)


def test_raw_maps_use_their_strength_and_the_hinge():
    # Raw Grad-CAM mean is 1.25 > 1: a right prediction is no longer penalised (max(1 - m, 0)).
    model = _hand_model()
    images = torch.tensor([[2.0, 4.0], [6.0, 8.0]], dtype=torch.float64).expand(2, 1, 2, 2)
    labels = torch.tensor([0, 1])
    loss = SaliencyPenalisedLoss(DifferentiableGradCam(model, model[0]), lam=0.3, normalise=False)
    terms = loss(images, labels)
    assert terms.confidence.tolist() == [1.25, 1.25]
    assert terms.right_penalty.tolist() == [0.0, 0.0]
    assert terms.loss.item() == pytest.approx(_hand_expected(0.3, [0, 1], 1.25), rel=1e-12)


def test_ablation_weights():
    model = _hand_model()
    images = torch.tensor([[2.0, 4.0], [6.0, 8.0]], dtype=torch.float64).expand(1, 1, 2, 2)
    saliency = DifferentiableGradCam(model, model[0])
    terms = SaliencyPenalisedLoss(saliency, lam=0.5, right_weight=0.0)(images, torch.tensor([0]))
    assert terms.loss.item() == pytest.approx(_hand_expected(0.5, [0], 0.625, 0.0), rel=1e-12)


class _VanishingGradCam(DifferentiableGradCam):
    """Grad-CAM whose ReLU has cut every location, as training can make it."""

    def _maps(self, activation, outputs, classes, inputs, guide):
        return super()._maps(activation, outputs, classes, inputs, guide) * 0


def test_an_all_zero_map_has_zero_confidence_and_finite_gradients():
    model = tiny_cnn()
    images, labels = tiny_batch()
    terms = SaliencyPenalisedLoss(_VanishingGradCam(model, model[2]))(images, labels)
    assert torch.equal(terms.confidence, torch.zeros(4, dtype=torch.float64))
    terms.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


class _Functional(nn.Module):
    """Runs ``net`` with its parameters replaced by the given tensors (for gradcheck)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.parameters_in_use: dict = {}

    def forward(self, x):
        return torch.func.functional_call(self.net, self.parameters_in_use, (x,))


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_of_the_penalised_loss(method):
    net = tiny_cnn()
    model = _Functional(net)
    names = [name for name, _ in net.named_parameters()]
    images, labels = tiny_batch()
    loss = SaliencyPenalisedLoss(method(model, net[2]), lam=0.5)

    def penalised_loss(*parameters):
        model.parameters_in_use = dict(zip(names, parameters))
        return loss(images, labels).loss

    parameters = tuple(p.detach().clone().requires_grad_() for p in net.parameters())
    assert torch.autograd.gradcheck(penalised_loss, parameters, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_exactly_the_trained_layer(method):
    model = tiny_cnn()
    images, labels = tiny_batch()
    flags = [p.requires_grad for p in model.parameters()]
    with train_only(model, model[2]) as trainable:
        assert trainable == list(model[2].parameters())
        SaliencyPenalisedLoss(method(model, model[2]))(images, labels).loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("2."):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    assert [p.requires_grad for p in model.parameters()] == flags


def test_a_new_layer_for_transfer_learning():
    backbone = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())
    new_layer = nn.Conv2d(3, 4, 1)
    head = nn.Linear(4, 3)
    model = nn.Sequential(
        backbone, new_layer, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head
    ).double()
    images, labels = tiny_batch()
    with train_only(model, [new_layer, head]):
        loss = SaliencyPenalisedLoss(DifferentiableGuidedGradCam(model, new_layer))
        loss(images, labels).loss.backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None for p in [*new_layer.parameters(), *head.parameters()])
    assert all(p.requires_grad for p in model.parameters())


def test_train_only_restores_flags_after_an_exception_and_checks_modules():
    model = tiny_cnn()
    model[0].weight.requires_grad_(False)
    with pytest.raises(KeyError), train_only(model, model[0]):
        assert model[0].weight.requires_grad and not model[2].weight.requires_grad
        raise KeyError
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    with pytest.raises(ValueError, match="no parameters"), train_only(model, model[1]):
        pass
    with pytest.raises(ValueError, match="not a submodule"), train_only(model, nn.Linear(1, 1)):
        pass


@pytest.mark.parametrize("method", METHODS)
def test_the_loss_leaves_the_model_untouched(method):
    model = tiny_cnn(inplace=True)
    images, labels = tiny_batch()
    before = model_snapshot(model)
    SaliencyPenalisedLoss(method(model, model[2]))(images, labels)
    assert_model_unchanged(model, before)
    with pytest.raises(ValueError, match="out of range"):
        SaliencyPenalisedLoss(method(model, model[2]))(images, torch.tensor([0, 1, 2, 9]))
    assert_model_unchanged(model, before)


def test_clear_errors():
    model = tiny_cnn()
    images, labels = tiny_batch()
    with pytest.raises(ValueError, match="lam"):
        SaliencyPenalisedLoss(DifferentiableGradCam(model, model[2]), lam=1.5)
    with pytest.raises(ValueError, match="right_weight"):
        SaliencyPenalisedLoss(DifferentiableGradCam(model, model[2]), right_weight=-1)
    with pytest.raises(TypeError, match="DifferentiableSaliency"):
        SaliencyPenalisedLoss(model)
    with pytest.raises(ValueError, match="not a submodule"):
        DifferentiableGradCam(model, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="spatial"):
        DifferentiableGradCam(model, model[6])(images)
    with pytest.raises(ValueError, match="labels are required"):
        SaliencyPenalisedLoss(DifferentiableGradCam(model, model[2]))(images, None)
    with pytest.raises(ValueError, match="NaN"):
        DifferentiableGradCam(model, model[2])(images * float("nan"))
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Conv2d(2, 2, 1), shared, nn.Conv2d(2, 2, 1), shared, nn.Flatten())
    with pytest.raises(RuntimeError, match="ran 2 times"):
        DifferentiableGradCam(twice.double(), shared)(images)
