"""LayerNormGradOrder1 and LayerNormGradAdversarial compute the formulas of DESIGN.md section 1.

The reference below is written from the formula alone: the network as plain functions of ONE flat
parameter vector, ``torch.func.grad`` for gradients and the FULL Jacobian of the layer gradient
(``jacrev``) for the Hessian term, no hooks and no functional_call. It shares no code path with the
implementation (finite difference or forward-over-reverse ``jvp``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jacrev

import captum_normgrad._order1.vmap as vmap_mode
from captum_normgrad import LayerNormGrad
from captum_normgrad.order1 import LayerNormGradAdversarial, LayerNormGradOrder1

ORDER1_SIGN = {LayerNormGradOrder1: 1.0, LayerNormGradAdversarial: -1.0}


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """conv -> tanh -> 1x1 conv -> tanh -> mean pool -> linear; smooth, so the finite difference
    converges cleanly. The attributed layer is ``conv2`` (its output, or its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.Tanh()
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        a = self.conv2(self.act(self.conv1(x)))
        return self.head(torch.tanh(a).mean(dim=(2, 3)))


def tiny_problem(dtype=torch.float64):
    model = TinyNet().to(dtype).eval()
    with torch.no_grad():  # larger weights: a clearly non-linear network, a visible correction
        for parameter in model.parameters():
            parameter.mul_(3.0)
    images = torch.randn(3, 2, 4, 5, dtype=dtype)
    labels = torch.tensor([0, 3, 1])
    return model, images, labels


def reference_maps(
    model, images, labels, eps, sign, at_input=False, trainable=None, loss=None, h_scale=None
):
    """The map of DESIGN.md section 1 for each example, from the formula.

    ``sign=+1``: theta' = theta - eps grad l, m = ||g(theta') - eps H(theta) v|| ||x(theta')||;
    ``sign=-1`` (adversarial): theta' = theta + eps grad l, m = ||g(theta') + eps H v|| ||x(theta')||.
    ``H v`` is the full Jacobian of ``g`` times ``v``, or with ``h_scale`` the paper's central
    difference with ``h = h_scale / ||v||``.
    """
    fixed = {name: p.detach() for name, p in model.named_parameters()}
    names = [n for n in fixed if trainable is None or n in trainable]
    shapes = [fixed[n].shape for n in names]
    sizes = [fixed[n].numel() for n in names]
    theta = torch.cat([fixed[n].reshape(-1) for n in names])
    loss = loss or (lambda logits, label: F.cross_entropy(logits, label, reduction="sum"))

    def params(vector):
        out = dict(fixed)
        for name, shape, piece in zip(names, shapes, torch.split(vector, sizes)):
            out[name] = piece.reshape(shape)
        return out

    def before(p, x):  # up to the attributed activation
        hidden = torch.tanh(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1))
        return hidden if at_input else F.conv2d(hidden, p["conv2.weight"], p["conv2.bias"])

    def after(p, a, label):
        if at_input:
            a = F.conv2d(a, p["conv2.weight"], p["conv2.bias"])
        return loss(
            F.linear(torch.tanh(a).mean(dim=(2, 3)), p["head.weight"], p["head.bias"]), label
        )

    maps = []
    for x, label in zip(images.split(1), labels.split(1)):

        def total_loss(vector, x=x, label=label):
            p = params(vector)
            return after(p, before(p, x), label)

        def layer_gradient(vector, x=x, label=label):
            p = params(vector)
            return grad(lambda a: after(p, a, label))(before(p, x))

        stepped = theta - sign * eps * grad(total_loss)(theta)
        direction = grad(total_loss)(stepped)
        if h_scale is None:
            jacobian = jacrev(layer_gradient)(theta)  # (1, C, *S, P)
            hessian_term = jacobian @ direction
        else:
            h = h_scale / direction.norm()
            shifted = layer_gradient(theta + h * direction), layer_gradient(theta - h * direction)
            hessian_term = (shifted[0] - shifted[1]) / (2 * h)
        corrected = layer_gradient(stepped) - sign * eps * hessian_term
        activation = before(params(stepped), x)
        maps.append(corrected.norm(dim=1, keepdim=True) * activation.norm(dim=1, keepdim=True))
    return torch.cat(maps)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("method", [LayerNormGradOrder1, LayerNormGradAdversarial])
@pytest.mark.parametrize("batch_mode", ["loop", "vmap"])
def test_exact_hvp_matches_the_reference(method, batch_mode):
    model, images, labels = tiny_problem()
    eps = 0.3
    maps = method(model, model.conv2).attribute(
        images, target=labels, eps=eps, hvp="exact", batch_mode=batch_mode
    )
    expected = reference_maps(model, images, labels, eps, ORDER1_SIGN[method])
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)
    # The correction is far from negligible here, so the test sees a wrong Hessian term.
    order0 = LayerNormGrad(model, model.conv2).attribute(images, target=labels)
    assert relative_error(order0, expected) > 0.05


@pytest.mark.parametrize("method", [LayerNormGradOrder1, LayerNormGradAdversarial])
def test_finite_difference_converges_to_the_reference_as_h_shrinks(method):
    model, images, labels = tiny_problem()
    eps = 0.3
    expected = reference_maps(model, images, labels, eps, ORDER1_SIGN[method])
    exact = method(model, model.conv2).attribute(images, target=labels, eps=eps, hvp="exact")
    errors, gaps = [], []
    for h_scale in (0.1, 0.01, 0.001):
        maps = method(model, model.conv2).attribute(images, target=labels, eps=eps, h_scale=h_scale)
        errors.append(relative_error(maps, expected))
        gaps.append(relative_error(maps, exact))
    # Central difference: error O(h^2), so 10x smaller h gives ~100x smaller error.
    assert errors[0] > 1e-3
    assert errors[1] < errors[0] / 30 and errors[2] < errors[1] / 30
    assert errors[2] < 1e-5
    assert gaps == pytest.approx(errors, rel=1e-2)


@pytest.mark.parametrize("method", [LayerNormGradOrder1, LayerNormGradAdversarial])
@pytest.mark.parametrize("batch_mode", ["loop", "vmap"])
def test_finite_difference_matches_the_paper_formula_at_the_default_step(method, batch_mode):
    model, images, labels = tiny_problem()
    maps = method(model, model.conv2).attribute(
        images, target=labels, eps=0.3, batch_mode=batch_mode
    )
    sign = ORDER1_SIGN[method]
    expected = reference_maps(model, images, labels, 0.3, sign, h_scale=0.5)
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)
    # h = 0.5 / ||v|| is a large step here: a different h would give a visibly different map.
    assert relative_error(maps, reference_maps(model, images, labels, 0.3, sign)) > 1e-2


def test_adversarial_is_order1_with_the_signs_flipped():
    model, images, labels = tiny_problem()
    eps = 0.3
    adversarial = LayerNormGradAdversarial(model, model.conv2).attribute(
        images, target=labels, eps=eps, hvp="exact"
    )
    order1 = LayerNormGradOrder1(model, model.conv2).attribute(
        images, target=labels, eps=eps, hvp="exact"
    )
    # Adversarial at eps is order 1 at -eps: both the inner step and the correction flip.
    torch.testing.assert_close(adversarial, reference_maps(model, images, labels, -eps, 1.0))
    assert relative_error(adversarial, order1) > 0.05


def test_hand_derived_linear_softmax_model():
    """logits = W x, layer = the identity on x: everything has a closed form.

    g(W) = W^T (p - y) with p = softmax(W x); its derivative along V is
    V^T (p - y) + W^T (diag(p) - p p^T) V x.
    """
    weight = torch.tensor([[1.0, -2.0], [0.5, 1.5]], dtype=torch.float64)
    x = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)  # label 0
    model = nn.Sequential(nn.Identity(), nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(weight)
    eps = 0.2

    def softmax_at(w):
        return torch.softmax(w @ x[0], dim=0)

    p = softmax_at(weight)
    stepped = weight - eps * torch.outer(p - y, x[0])
    p_stepped = softmax_at(stepped)
    direction = torch.outer(p_stepped - y, x[0])
    derivative = direction.T @ (p - y) + weight.T @ (torch.diag(p) - torch.outer(p, p)) @ (
        direction @ x[0]
    )
    corrected = stepped.T @ (p_stepped - y) - eps * derivative
    expected = corrected.norm() * x[0].norm()

    for hvp, h_scale, tolerance in (("exact", 0.5, 1e-12), ("finite_difference", 1e-4, 1e-8)):
        maps = LayerNormGradOrder1(model, model[0]).attribute(
            x, target=0, eps=eps, h_scale=h_scale, hvp=hvp
        )
        assert maps.shape == (1, 1)
        torch.testing.assert_close(maps, expected.reshape(1, 1), rtol=tolerance, atol=0.0)


def test_eps_to_zero_gives_order_0():
    model, images, labels = tiny_problem()
    order0 = LayerNormGrad(model, model.conv2).attribute(images, target=labels)
    errors = []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):
        maps = LayerNormGradOrder1(model, model.conv2).attribute(images, target=labels, eps=eps)
        errors.append(relative_error(maps, order0))
    assert errors[0] > 1e-2
    for larger, smaller in zip(errors, errors[1:]):
        assert smaller < larger / 5  # O(eps)
    assert errors[-1] < 1e-3


def test_attribute_to_layer_input_matches_the_reference():
    model, images, labels = tiny_problem()
    maps = LayerNormGradOrder1(model, model.conv2).attribute(
        images, target=labels, eps=0.3, hvp="exact", attribute_to_layer_input=True
    )
    expected = reference_maps(model, images, labels, 0.3, 1.0, at_input=True)
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)


def test_frozen_parameters_are_not_stepped():
    model, images, labels = tiny_problem()
    model.conv1.requires_grad_(False)
    maps = LayerNormGradOrder1(model, model.conv2).attribute(
        images, target=labels, eps=0.3, hvp="exact"
    )
    trainable = {"conv2.weight", "conv2.bias", "head.weight", "head.bias"}
    expected = reference_maps(model, images, labels, 0.3, 1.0, trainable=trainable)
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)
    assert relative_error(maps, reference_maps(model, images, labels, 0.3, 1.0)) > 1e-3
    assert not any(p.requires_grad for p in model.conv1.parameters())


def test_several_layers_equal_one_layer_at_a_time():
    model, images, labels = tiny_problem()
    both = LayerNormGradOrder1(model, [model.conv1, model.conv2]).attribute(
        images, target=labels, eps=0.3
    )
    for layer, maps in zip((model.conv1, model.conv2), both):
        alone = LayerNormGradOrder1(model, layer).attribute(images, target=labels, eps=0.3)
        torch.testing.assert_close(maps, alone, rtol=1e-12, atol=1e-14)
    assert [m.shape for m in both] == [(3, 1, 4, 5), (3, 1, 4, 5)]


def test_single_layer_in_a_list_returns_a_list():
    model, images, labels = tiny_problem()
    maps = LayerNormGradOrder1(model, [model.conv2]).attribute(images, target=labels)
    assert isinstance(maps, list) and len(maps) == 1


def test_callable_loss_matches_the_reference():
    model, images, _ = tiny_problem()
    goals = torch.randn(3, 4, dtype=torch.float64)

    def squared_error(outputs, target):
        return ((outputs - target) ** 2).sum(dim=1)

    def summed(outputs, target):
        return squared_error(outputs, target).sum()

    expected = reference_maps(model, images, goals, 0.3, 1.0, loss=summed)
    for batch_mode in ("loop", "vmap"):
        maps = LayerNormGradOrder1(model, model.conv2).attribute(
            images, target=goals, loss=squared_error, eps=0.3, hvp="exact", batch_mode=batch_mode
        )
        torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)


def test_top1_label_when_target_is_none():
    model, images, _ = tiny_problem()
    top1 = model(images).argmax(dim=1)
    method = LayerNormGradOrder1(model, model.conv2)
    torch.testing.assert_close(
        method.attribute(images, eps=0.3), method.attribute(images, target=top1, eps=0.3)
    )


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_loop_and_vmap_give_the_same_maps(chunk_size):
    model, images, labels = tiny_problem()
    method = LayerNormGradOrder1(model, [model.conv1, model.conv2])
    loop = method.attribute(images, target=labels, eps=0.3, batch_mode="loop")
    vmapped = method.attribute(
        images, target=labels, eps=0.3, batch_mode="vmap", chunk_size=chunk_size
    )
    for a, b in zip(loop, vmapped):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_vmapped_chunks_are_as_equal_as_can_be(monkeypatch):
    """Four examples in chunks of at most 3 run as 2 + 2: a short last chunk costs nearly what a
    full one does."""
    model, images, labels = tiny_problem()
    images, labels = torch.cat([images, images[:1]]), torch.cat([labels, labels[:1]])
    sizes, real_vmap = [], vmap_mode.vmap

    def counting_vmap(function, in_dims):
        mapped = real_vmap(function, in_dims=in_dims)

        def run(example):
            sizes.append(example["inputs"][0].shape[0])
            return mapped(example)

        return run

    method = LayerNormGradOrder1(model, model.conv2)
    loop = method.attribute(images, target=labels, eps=0.3, batch_mode="loop")
    monkeypatch.setattr(vmap_mode, "vmap", counting_vmap)
    vmapped = method.attribute(images, target=labels, eps=0.3, batch_mode="vmap", chunk_size=3)
    assert sizes == [2, 2]
    torch.testing.assert_close(vmapped, loop, rtol=1e-12, atol=1e-14)


class ScaledNet(nn.Module):
    """A forward function with an extra per-example argument and a bound-method entry point."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet().double()

    def forward(self, x: Tensor, scale: Tensor, offset: float) -> Tensor:
        return self.net(x * scale[:, :, None, None] + offset)

    def logits_of_doubled(self, x: Tensor) -> Tensor:
        return self.net(2.0 * x)


@pytest.mark.parametrize("batch_mode", ["loop", "vmap"])
def test_per_example_additional_arguments_are_split(batch_mode):
    model = ScaledNet().eval()
    images = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    scales = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64)
    labels = torch.tensor([0, 3, 1])
    method = LayerNormGradOrder1(model, model.net.conv2)
    together = method.attribute(
        images, target=labels, additional_forward_args=(scales, 0.25), batch_mode=batch_mode
    )
    for index in range(3):
        alone = method.attribute(
            images[index : index + 1],
            target=labels[index : index + 1],
            additional_forward_args=(scales[index : index + 1], 0.25),
        )
        torch.testing.assert_close(together[index : index + 1], alone, rtol=1e-12, atol=1e-14)


def test_bound_method_forward_func_steps_the_owner():
    model = ScaledNet().eval()
    images = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([2, 1])
    maps = LayerNormGradOrder1(model.logits_of_doubled, model.net.conv2).attribute(
        images, target=labels, eps=0.3, hvp="exact"
    )
    expected = reference_maps(model.net, 2.0 * images, labels, 0.3, 1.0)
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)
