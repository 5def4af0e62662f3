"""LayerNormGrad and LayerNormGradSelective compute the formulas of DESIGN.md section 1."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from captum.attr import LayerActivation, LayerGradCam, LayerGradientXActivation
from torch import nn

from captum_normgrad import LayerNormGrad, LayerNormGradSelective


class SumHead(nn.Module):
    """1x1 identity conv, then logits_k = sum_u V_k . a_u: the gradient is V_k at every location."""

    def __init__(self, head: list[list[float]]) -> None:
        super().__init__()
        self.identity = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.identity.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        self.head = nn.Linear(2, len(head), bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.identity(x).sum(dim=(2, 3)))


def two_location_input() -> torch.Tensor:
    # location 0 holds (3, 4): norm 5; location 1 holds (0, 1): norm 1
    return torch.tensor([[[[3.0, 0.0]], [[4.0, 1.0]]]])


def test_output_convention_by_hand():
    model = SumHead([[1.0, 0.0], [6.0, 8.0]])
    maps = LayerNormGrad(model, model.identity).attribute(
        two_location_input(), target=1, loss="output"
    )
    # g_u = V_1 = (6, 8), ||g_u|| = 10 everywhere: m = (5 * 10, 1 * 10)
    assert maps.shape == (1, 1, 1, 2)
    torch.testing.assert_close(maps, torch.tensor([[[[50.0, 10.0]]]]))


def test_cross_entropy_by_hand():
    model = SumHead([[1.0, 0.0], [0.0, 0.5]])
    maps = LayerNormGrad(model, model.identity).attribute(two_location_input(), target=0)
    # summed activation (3, 5): logits (3, 2.5); d CE / d logits = p - onehot(0)
    p0 = math.exp(3.0) / (math.exp(3.0) + math.exp(2.5))
    p1 = 1.0 - p0
    # g_u = (p0 - 1) V_0 + p1 V_1 = (p0 - 1, 0.5 p1), the same at both locations
    gradient_norm = math.hypot(p0 - 1.0, 0.5 * p1)
    expected = torch.tensor([[[[5.0 * gradient_norm, 1.0 * gradient_norm]]]])
    torch.testing.assert_close(maps, expected)


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )


def reference_activation_and_gradient(model, images, labels, upto):
    """``x`` after ``model[:upto]`` and ``d CE_sum / d x``, by running the halves by hand."""
    activation = model[:upto](images).detach().requires_grad_()
    loss = nn.functional.cross_entropy(model[upto:](activation), labels, reduction="sum")
    (gradient,) = torch.autograd.grad(loss, activation)
    return activation.detach(), gradient


@pytest.mark.parametrize("upto", [2, 4])
def test_matches_float64_outer_product_reference(upto):
    model = small_cnn().double().eval()
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    activation, gradient = reference_activation_and_gradient(model, images, labels, upto)
    # Frobenius norm of each location's contribution g_u x_u^T to a 1x1 identity conv's weight grad
    outer = torch.einsum("nchw,ndhw->ncdhw", gradient, activation)
    expected = torch.linalg.matrix_norm(outer.permute(0, 3, 4, 1, 2)).unsqueeze(1)
    maps = LayerNormGrad(model, model[upto - 1]).attribute(images, target=labels)
    torch.testing.assert_close(maps, expected, rtol=1e-12, atol=1e-14)


def test_layer_input_is_the_previous_layer_output():
    model = small_cnn().double().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    at_input = LayerNormGrad(model, model[2]).attribute(
        images, target=1, attribute_to_layer_input=True
    )
    at_output = LayerNormGrad(model, model[1]).attribute(images, target=1)
    torch.testing.assert_close(at_input, at_output, rtol=1e-12, atol=1e-14)


def test_vector_activations_give_one_value_per_example():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    maps = LayerNormGrad(model, model[1]).attribute(inputs, target=2)
    activation = model[:2](inputs).detach().requires_grad_()
    loss = nn.functional.cross_entropy(model[2](activation), torch.full((5,), 2), reduction="sum")
    (gradient,) = torch.autograd.grad(loss, activation)
    expected = activation.norm(dim=1, keepdim=True) * gradient.norm(dim=1, keepdim=True)
    assert maps.shape == (5, 1)
    torch.testing.assert_close(maps, expected.detach())


@pytest.mark.parametrize("location_dims", [1, 3])
def test_any_number_of_location_dims(location_dims):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[location_dims]
    pool = {1: nn.AdaptiveAvgPool1d, 3: nn.AdaptiveAvgPool3d}[location_dims]
    model = nn.Sequential(conv(2, 3, 3), nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(3, 2))
    model = model.double()
    inputs = torch.randn(2, 2, *([5] * location_dims), dtype=torch.float64)
    activation, gradient = reference_activation_and_gradient(model, inputs, torch.tensor([1, 0]), 2)
    expected = activation.norm(dim=1, keepdim=True) * gradient.norm(dim=1, keepdim=True)
    maps = LayerNormGrad(model, model[1]).attribute(inputs, target=[1, 0])
    assert maps.shape == (2, 1, *([3] * location_dims))
    torch.testing.assert_close(maps, expected)


def test_user_loss_callable_is_backpropagated():
    model = small_cnn().double().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    def squared_error(outputs, target):
        return ((outputs - target) ** 2).sum(dim=1)

    goal = torch.randn(2, 3, dtype=torch.float64)
    maps = LayerNormGrad(model, model[3]).attribute(images, target=goal, loss=squared_error)
    activation = model[:4](images).detach().requires_grad_()
    (gradient,) = torch.autograd.grad(squared_error(model[4:](activation), goal).sum(), activation)
    expected = activation.norm(dim=1, keepdim=True) * gradient.norm(dim=1, keepdim=True)
    torch.testing.assert_close(maps, expected.detach())


def test_target_none_uses_the_top1_prediction():
    model = small_cnn().double().eval()
    images = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    top1 = model(images).argmax(dim=1)
    normgrad = LayerNormGrad(model, model[3])
    torch.testing.assert_close(normgrad.attribute(images), normgrad.attribute(images, target=top1))


@pytest.mark.parametrize("loss, sign", [("output", 1.0), ("cross_entropy", -1.0)])
def test_selective_keeps_channels_pushing_toward_the_target(loss, sign):
    model = small_cnn().double().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([2, 0])
    activation = model[:4](images).detach().requires_grad_()
    outputs = model[4:](activation)
    if loss == "output":
        backpropagated = outputs.gather(1, labels[:, None]).sum()
    else:
        backpropagated = nn.functional.cross_entropy(outputs, labels, reduction="sum")
    (gradient,) = torch.autograd.grad(backpropagated, activation)
    expected = (sign * activation * gradient).clamp_min(0).norm(dim=1, keepdim=True)
    maps = LayerNormGradSelective(model, model[3]).attribute(images, target=labels, loss=loss)
    torch.testing.assert_close(maps, expected.detach())
    assert (
        maps < LayerNormGrad(model, model[3]).attribute(images, labels, loss=loss) + 1e-12
    ).all()


def test_gradcam_is_positive_cosine_times_normgrad_before_global_pooling():
    """DESIGN.md 1: where g is uniform over locations, GradCAM_u = cos(g_u, x_u)_+ * NormGrad_u."""
    model = torchvision.models.resnet18(weights=None, num_classes=10).double().eval()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    target = [3, 7]
    gradcam = LayerGradCam(model, model.layer4).attribute(
        images, target=target, relu_attributions=True
    )
    normgrad = LayerNormGrad(model, model.layer4).attribute(images, target=target, loss="output")
    activation = LayerActivation(model, model.layer4).attribute(images)
    gradient = LayerGradientXActivation(model, model.layer4, multiply_by_inputs=False).attribute(
        images, target=target
    )
    cosine = nn.functional.cosine_similarity(gradient, activation, dim=1).unsqueeze(1)
    torch.testing.assert_close(gradcam, cosine.clamp_min(0) * normgrad, rtol=1e-10, atol=1e-12)
    assert (gradcam > 0).any() and (gradcam == 0).any()  # the filter really filters


def test_several_layers_equal_separate_calls():
    model = small_cnn().double().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    layers = [model[3], model[0], model[1]]
    together = LayerNormGrad(model, layers).attribute(images, target=1)
    assert isinstance(together, list) and len(together) == 3
    for layer, layer_map in zip(layers, together):
        torch.testing.assert_close(layer_map, LayerNormGrad(model, layer).attribute(images, 1))
    single_list = LayerNormGrad(model, [model[1]]).attribute(images, target=1)
    assert isinstance(single_list, list) and len(single_list) == 1


class CountBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        CountBackward.calls += 1
        return grad


class Counted(nn.Module):
    # On the class: the methods restore the model's own attributes after each call.
    forward_calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.body = small_cnn()
        type(self).forward_calls = 0

    def forward(self, x):
        type(self).forward_calls += 1
        return CountBackward.apply(self.body(x))  # every backward pass starts here


def test_several_layers_take_one_forward_and_one_backward():
    model = Counted().eval()
    CountBackward.calls = 0
    LayerNormGrad(model, [model.body[0], model.body[1], model.body[3]]).attribute(
        torch.randn(2, 3, 8, 8), target=0
    )
    assert model.forward_calls == 1
    assert CountBackward.calls == 1


def test_create_graph_keeps_maps_differentiable():
    model = small_cnn().double().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    maps = LayerNormGrad(model, model[1]).attribute(images, target=labels, create_graph=True)
    assert maps.requires_grad
    (weight_grad,) = torch.autograd.grad(maps.sum(), model[0].weight)
    # the same derivative through the closed form written out by hand
    activation = model[:2](images)
    loss = nn.functional.cross_entropy(model[2:](activation), labels, reduction="sum")
    (gradient,) = torch.autograd.grad(loss, activation, create_graph=True)
    by_hand = (activation.norm(dim=1) * gradient.norm(dim=1)).sum()
    (expected,) = torch.autograd.grad(by_hand, model[0].weight)
    torch.testing.assert_close(weight_grad, expected)
    detached = LayerNormGrad(model, model[1]).attribute(images, target=labels)
    assert not detached.requires_grad
