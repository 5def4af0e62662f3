"""``attribute_to_layer_input=True``: which gradient and which value, for every method and batch mode.

The virtual identity sits on the layer's input edge, so ``g`` is the gradient that reaches the input
THROUGH the layer, also where the model uses the same tensor elsewhere (``x + f(x)``), and whether or
not anything upstream requires grad; ``x`` is the value the layer saw, also where the model changes
that tensor in place after the layer ran. Before this was fixed, order 0 took the gradient over
every use (but only when something upstream required grad) while order 1 took it through the layer,
and every method read an input changed in place afterwards at its new value.

The reference is the same network with a copying module on that edge, attributed at its OUTPUT: a
path that involves none of the input capture. (Not ``nn.Identity``: its output IS its input, the
tensor the skip connection uses too, and the gradient of a layer's output tensor is over all its
uses.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_normgrad import (
    LayerNormGrad,
    LayerNormGradAdversarial,
    LayerNormGradOrder1,
    LayerNormGradSelective,
)


class Copy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class SharedInput(nn.Module):
    """``2 x + relu(branch(x))``: the branch's input is also the skip connection.

    With ``with_edge`` the branch reads ``edge(x)``, the reference; with ``modify_after`` the model
    doubles ``x`` in place once the branch has run (``mul_`` needs no saved value, so autograd
    allows it), and the rest of the network sees the doubled tensor.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.edge = Copy()
        # ReLU first: it keeps its output for backward, so changing x afterwards is legal in
        # training (a convolution reading x directly would keep x itself).
        self.branch = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4, 3)
        self.with_edge = False
        self.modify_after = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)  # a convolution keeps its input, not its output, for backward
        branch = torch.relu(self.branch(self.edge(x) if self.with_edge else x))
        if self.modify_after:
            x.mul_(2)
        else:
            x = x * 2
        return self.head((x + branch).mean((2, 3)))


def _problem():
    torch.manual_seed(0)
    model = SharedInput().double().eval()
    images = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    return model, images, [0, 2, 1]


ORDER0 = [LayerNormGrad, LayerNormGradSelective]
ORDER1 = [LayerNormGradOrder1, LayerNormGradAdversarial]


def _attribute(method, model, layer, images, target, at_input, **kwargs):
    return method(model, layer).attribute(
        images, target=target, attribute_to_layer_input=at_input, **kwargs
    )


@pytest.mark.parametrize("method", ORDER0)
@pytest.mark.parametrize("frozen_stem", [False, True], ids=["stem-trainable", "stem-frozen"])
def test_order0_input_gradient_is_the_one_through_the_layer(method, frozen_stem):
    model, images, target = _problem()
    model.stem.requires_grad_(not frozen_stem)  # nothing upstream requires grad when frozen
    at_input = _attribute(method, model, model.branch, images, target, at_input=True)
    model.with_edge = True
    reference = _attribute(method, model, model.edge, images, target, at_input=False)
    torch.testing.assert_close(at_input, reference, rtol=1e-12, atol=0)


def test_order0_input_map_from_the_formula():
    """``||x_u|| * ||g_u||`` with ``g`` the derivative with respect to the branch's own copy of x."""
    model, images, target = _problem()
    x = model.stem(images).detach()
    branch_input = x.clone().requires_grad_()
    logits = model.head((x * 2 + torch.relu(model.branch(branch_input))).mean((2, 3)))
    loss = nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum")
    (g,) = torch.autograd.grad(loss, branch_input)
    expected = (x.norm(dim=1) * g.norm(dim=1)).unsqueeze(1)
    actual = _attribute(LayerNormGrad, model, model.branch, images, target, at_input=True)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ORDER1)
@pytest.mark.parametrize("batch_mode", ["loop", "factored", "vmap"])
@pytest.mark.parametrize("hvp", ["finite_difference", "exact"])
def test_order1_input_gradient_is_the_one_through_the_layer(method, batch_mode, hvp):
    model, images, target = _problem()
    kwargs = {"batch_mode": batch_mode, "hvp": hvp, "eps": 0.05}
    at_input = _attribute(method, model, model.branch, images, target, True, **kwargs)
    model.with_edge = True
    reference = _attribute(
        method, model, model.edge, images, target, False, batch_mode="loop", hvp=hvp, eps=0.05
    )
    torch.testing.assert_close(at_input, reference, rtol=1e-9, atol=1e-12)


def test_order1_at_an_input_tends_to_order0_there():
    model, images, target = _problem()
    order1 = _attribute(LayerNormGradOrder1, model, model.branch, images, target, True, eps=1e-9)
    order0 = _attribute(LayerNormGrad, model, model.branch, images, target, at_input=True)
    torch.testing.assert_close(order1, order0, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize(
    "method, kwargs",
    [
        (LayerNormGrad, {}),
        (LayerNormGradSelective, {}),
        *[
            (method, {"batch_mode": mode, "eps": 0.05})
            for method in ORDER1
            for mode in ["loop", "factored", "vmap", "auto"]
        ],
    ],
    ids=lambda v: getattr(v, "__name__", None) or str(v.get("batch_mode", "")),
)
def test_an_input_changed_in_place_after_the_layer_keeps_the_value_the_layer_saw(method, kwargs):
    model, images, target = _problem()
    expected = _attribute(method, model, model.branch, images, target, True, **kwargs)
    model.modify_after = True
    actual = _attribute(method, model, model.branch, images, target, True, **kwargs)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-15)


def test_order1_reads_the_input_side_layout_at_an_input():
    """A ConvNeXt block's first ``Permute`` takes channels first and gives channels last: at its
    input the map is ``(N, 1, H, W)``. The loop's records once lacked ``at_input`` and read the
    output side's layout there, a ``(N, 1, W, C)`` map normed over the height."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, None, 2)], num_classes=3).double().eval()
    permute = model.features[1][0].block[1]
    images = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    order1 = _attribute(LayerNormGradOrder1, model, permute, images, [0, 1], True, eps=1e-9)
    order0 = _attribute(LayerNormGrad, model, permute, images, [0, 1], at_input=True)
    assert order1.shape == (2, 1, 12, 10)
    torch.testing.assert_close(order1, order0, rtol=1e-6, atol=1e-10)
