"""The guided-gradient alignment regulariser of papers/004 (double backpropagation)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop
from model_state import assert_model_unchanged, model_snapshot
from tiny_models import tiny_batch, tiny_cnn
from torch import nn

from captum_normgrad.training import GuidedGradientAlignment, gradient_alignment, train_only

pytestmark = pytest.mark.usefixtures("one_thread")


def test_value_on_a_hand_checked_case():
    # Identity first layer, both units active, output weights (1, -1): plain gradient (1, -1),
    # guided (1, 0), cosine 1 / sqrt(2). Logits (1 - 2, 0) = (-1, 0) for the input (1, 2).
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[2].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    model = model.double()
    inputs = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    terms = GuidedGradientAlignment(model, weight=0.5)(inputs, torch.tensor([0]))
    assert terms.plain_gradient.tolist() == [[1.0, -1.0]]
    assert terms.guided_gradient.tolist() == [[1.0, 0.0]]
    assert terms.alignment.item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-15)
    cross_entropy = math.log(1 + math.exp(1.0))  # -log softmax(-1, 0)[0]
    assert terms.loss.item() == pytest.approx(cross_entropy + 0.5 * (1 - 1 / math.sqrt(2)))


def test_zero_gradients_have_no_direction():
    plain = torch.zeros(2, 3, requires_grad=True)
    alignment = gradient_alignment(plain, torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
    alignment.sum().backward()
    assert alignment.tolist() == [1.0, 1.0]
    assert torch.equal(plain.grad, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cannot be compared"):
        gradient_alignment(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("inplace", [False, True])
def test_gradients_equal_independent_references(inplace):
    model = tiny_cnn(inplace)
    images, labels = tiny_batch()
    terms = GuidedGradientAlignment(model)(images, labels)
    guided = GuidedBackprop(model).attribute(images, target=labels)
    torch.testing.assert_close(terms.guided_gradient, guided, rtol=1e-12, atol=1e-15)
    inputs = images.clone().requires_grad_()
    (plain,) = torch.autograd.grad(model(inputs).gather(1, labels[:, None]).sum(), inputs)
    torch.testing.assert_close(terms.plain_gradient, plain, rtol=1e-12, atol=1e-15)
    expected = 1 - F.cosine_similarity(plain.flatten(1), guided.flatten(1), dim=1)
    torch.testing.assert_close(terms.alignment, expected, rtol=1e-12, atol=1e-15)


class _Functional(nn.Module):
    """Runs ``net`` with its parameters replaced by the given tensors (for gradcheck)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.parameters_in_use: dict = {}

    def forward(self, x):
        return torch.func.functional_call(self.net, self.parameters_in_use, (x,))


def test_gradcheck_with_the_guided_target_held_fixed():
    net = tiny_cnn()
    model = _Functional(net)
    names = [name for name, _ in net.named_parameters()]
    images, labels = tiny_batch()
    regulariser = GuidedGradientAlignment(model)
    model.parameters_in_use = dict(net.named_parameters())
    fixed_target = regulariser(images, labels).guided_gradient

    def alignment(*parameters):
        model.parameters_in_use = dict(zip(names, parameters))
        plain = regulariser(images, labels).plain_gradient
        return gradient_alignment(plain, fixed_target)

    parameters = tuple(p.detach().clone().requires_grad_() for p in net.parameters())
    assert torch.autograd.gradcheck(alignment, parameters, eps=1e-6, atol=1e-6)


def test_the_loss_gradient_treats_the_guided_gradient_as_a_constant():
    model = tiny_cnn()
    images, labels = tiny_batch()
    terms = GuidedGradientAlignment(model, weight=2.0)(images, labels)
    ours = torch.autograd.grad(terms.loss, list(model.parameters()))
    # Independent: plain autograd, no hooks, the guided target frozen.
    inputs = images.clone().requires_grad_()
    outputs = model(inputs)
    (plain,) = torch.autograd.grad(
        outputs.gather(1, labels[:, None]).sum(), inputs, create_graph=True
    )
    cosine = F.cosine_similarity(plain.flatten(1), terms.guided_gradient.flatten(1), dim=1)
    reference = (F.cross_entropy(outputs, labels, reduction="none") + 2.0 * (1 - cosine)).mean()
    theirs = torch.autograd.grad(reference, list(model.parameters()))
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def test_gradients_reach_exactly_the_unfrozen_parameters():
    model = tiny_cnn()
    images, labels = tiny_batch()
    with train_only(model, model[0]):
        terms = GuidedGradientAlignment(model)(images, labels)
        (terms.alignment.sum()).backward()  # only the double-backpropagated term
    assert model[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*model[2].parameters(), *model[6].parameters()])


def test_the_model_is_untouched_also_on_errors():
    model = tiny_cnn(inplace=True)
    images, labels = tiny_batch()
    before = model_snapshot(model)
    GuidedGradientAlignment(model)(images, labels)
    assert_model_unchanged(model, before)
    with pytest.raises(ValueError, match="out of range"):
        GuidedGradientAlignment(model)(images, torch.tensor([0, 1, 2, 7]))
    assert_model_unchanged(model, before)


def test_clear_errors():
    model = tiny_cnn()
    images, labels = tiny_batch()
    with pytest.raises(ValueError, match="weight"):
        GuidedGradientAlignment(model, weight=-1.0)
    with pytest.raises(ValueError, match="labels are required"):
        GuidedGradientAlignment(model)(images, None)
    with pytest.raises(ValueError, match="NaN"):
        GuidedGradientAlignment(model)(images * float("inf"), labels)
    no_relu = nn.Sequential(nn.Flatten(), nn.Linear(50, 3)).double()
    with pytest.raises(RuntimeError, match="no nn.ReLU"):
        GuidedGradientAlignment(no_relu)(images, labels)
