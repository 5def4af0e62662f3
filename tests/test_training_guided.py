"""Guided backpropagation switched on inside one call, without touching the model."""

from __future__ import annotations

import pytest
import torch
from captum.attr import GuidedBackprop
from model_state import assert_model_unchanged, model_snapshot
from torch import nn

from captum_normgrad.training import guided_relus

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_layer(first, second):
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(first))
        model[2].weight.copy_(torch.tensor(second))
    return model.double()


def _gradients(model, inputs, target):
    inputs = inputs.detach().requires_grad_()
    with guided_relus(model) as guide:
        score = model(inputs)[:, target].sum()
        with guide.on():
            (guided,) = torch.autograd.grad(score, inputs, retain_graph=True)
        (plain,) = torch.autograd.grad(score, inputs)
    return guided, plain


def test_hand_checked_guided_and_plain_gradients():
    # Both hidden units active; the output weights (1, -1): the guided pass stops the negative one.
    model = _two_layer([[1.0, 0.0], [0.0, 1.0]], [[1.0, -1.0]])
    guided, plain = _gradients(model, torch.tensor([[1.0, 2.0]], dtype=torch.float64), 0)
    assert torch.equal(plain, torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    assert torch.equal(guided, torch.tensor([[1.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_gradient_equals_captum_guided_backprop(inplace):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    ).double()
    inputs = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    reference = GuidedBackprop(model).attribute(inputs, target=1)
    guided, plain = _gradients(model, inputs, 1)
    torch.testing.assert_close(guided, reference, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(guided, plain)


def test_the_model_is_untouched_and_leftover_tensor_hooks_are_inert():
    model = _two_layer([[1.0, 0.0], [0.0, 1.0]], [[1.0, -1.0]])
    before = model_snapshot(model)
    inputs = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    with guided_relus(model) as guide:
        score = model(inputs).sum()
    assert_model_unchanged(model, before)
    with pytest.raises(RuntimeError, match="ended"), guide.on():
        pass
    (after_the_block,) = torch.autograd.grad(score, inputs)
    assert torch.equal(after_the_block, torch.tensor([[1.0, -1.0]], dtype=torch.float64))

    with pytest.raises(ZeroDivisionError), guided_relus(model):
        model(inputs)
        _ = 1 / 0
    assert_model_unchanged(model, before)


def test_a_model_without_relu_modules_is_refused():
    model = nn.Linear(2, 1).double()
    inputs = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
    with guided_relus(model) as guide:
        model(inputs)
        with pytest.raises(RuntimeError, match="no nn.ReLU module ran"), guide.on():
            pass
