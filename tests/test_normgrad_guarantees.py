"""DESIGN.md section 3: the model is untouched, batches are invariant, misuse gets a clear error,
and Captum's conventions (targets, tuple inputs, extra args, no_grad, in-place ReLU) hold."""

from __future__ import annotations

import pytest
import torch
import torchvision
from model_state import assert_model_unchanged, model_snapshot
from tiny_models import bn_cnn
from torch import nn

from captum_normgrad import (
    LayerNormGrad,
    LayerNormGradConv,
    LayerNormGradOrder1,
    LayerNormGradSelective,
)
from captum_normgrad.training import NormGradMonitor

METHODS = [LayerNormGrad, LayerNormGradSelective, LayerNormGradConv]


def with_existing_grads(model: nn.Module) -> nn.Module:
    """Give some parameters a .grad (as mid-training) and freeze one, to see both are preserved."""
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    model[0].bias.grad = None
    model[7].bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("train_mode", [False, True])
def test_model_untouched_after_a_call(method, train_mode):
    model = with_existing_grads(bn_cnn()).train(train_mode)
    model[1].eval()  # mixed flags must survive too
    before = model_snapshot(model)
    method(model, [model[3]]).attribute(torch.randn(4, 3, 8, 8), target=[0, 1, 2, 0])
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_model_untouched_when_the_call_raises_after_the_forward(method):
    model = with_existing_grads(bn_cnn()).train()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        method(model, model[3]).attribute(torch.randn(2, 3, 8, 8), target=7)
    assert_model_unchanged(model, before)


def test_model_untouched_when_a_layer_runs_twice():
    model = torchvision.models.resnet18(weights=None, num_classes=4).train()
    before = model_snapshot(model)
    shared_relu = model.layer1[0].relu
    with pytest.raises(RuntimeError, match=r"layer1\.0\.relu' ran 2 times"):
        LayerNormGrad(model, shared_relu).attribute(torch.randn(2, 3, 32, 32), target=1)
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_each_example_alone(method):
    model = bn_cnn().double().eval()
    images = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([2, 0, 1, 1])
    batch = method(model, model[3]).attribute(images, target=target)
    alone = torch.cat(
        [
            method(model, model[3]).attribute(images[i : i + 1], target=int(target[i]))
            for i in range(4)
        ]
    )
    torch.testing.assert_close(batch, alone, rtol=1e-12, atol=1e-14)


def test_layer_that_never_ran_is_named():
    class WithSpareHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = bn_cnn()
            self.spare_head = nn.Linear(5, 3)  # registered, never called

        def forward(self, x):
            return self.body(x)

    model = WithSpareHead().eval()
    with pytest.raises(RuntimeError, match="layer 'spare_head' did not run"):
        LayerNormGrad(model, model.spare_head).attribute(torch.randn(1, 3, 8, 8), target=0)


@pytest.mark.parametrize(
    "target, message",
    [
        (3, "class 3 is out of range for 3"),
        ([0, 1, 2], "3 entries .* batch of 2"),
        (torch.tensor([0, -1]), "class -1 is out of range"),
        ((0, 1), "tuple targets"),
        (torch.tensor([0.5, 1.0]), "integer class indices"),
    ],
)
def test_bad_targets_for_cross_entropy(target, message):
    model = bn_cnn().eval()
    with pytest.raises(ValueError, match=message):
        LayerNormGrad(model, model[3]).attribute(torch.randn(2, 3, 8, 8), target=target)


@pytest.mark.parametrize(
    "target, message",
    [(5, "out of range"), ([0, 1, 2], "3 entries"), (None, "one value per example")],
)
def test_bad_targets_for_output_convention(target, message):
    model = bn_cnn().eval()
    with pytest.raises(ValueError, match=message):
        LayerNormGrad(model, model[3]).attribute(
            torch.randn(2, 3, 8, 8), target=target, loss="output"
        )


def test_cross_entropy_refuses_non_logit_outputs():
    # one score per example, (N,): no classes to take a cross-entropy over ((N, K, H, W) outputs
    # are a segmenter's, tests/test_segmentation.py)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(0))
    with pytest.raises(ValueError, match=r"\(N, num_classes\) logits.*shape \(32,\)"):
        LayerNormGrad(model, model[0]).attribute(torch.randn(1, 3, 4, 4), target=1)


def test_loss_callable_must_return_one_loss_per_example():
    model = bn_cnn().eval()
    with pytest.raises(ValueError, match=r"one loss per example, shape \(2,\); it returned \(\)"):
        LayerNormGrad(model, model[3]).attribute(
            torch.randn(2, 3, 8, 8), target=0, loss=lambda outputs, target: outputs.sum()
        )
    with pytest.raises(ValueError, match="loss must be"):
        LayerNormGrad(model, model[3]).attribute(torch.randn(2, 3, 8, 8), target=0, loss="mse")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused(bad):
    model = bn_cnn().eval()
    images = torch.randn(2, 3, 8, 8)
    images[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match="input 0 contains NaN or infinite"):
        LayerNormGrad(model, model[3]).attribute(images, target=0)


def test_layer_with_tuple_output_is_refused():
    class TwoOutputs(nn.Module):
        def forward(self, x):
            return x, x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.split = TwoOutputs()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.split(x)[0])

    model = Model()
    message = "layer 'split' has a tuple as its output; NormGrad needs a single tensor there"
    with pytest.raises(TypeError, match=message):
        LayerNormGrad(model, model.split).attribute(torch.randn(2, 4), target=0)
    # which entry of a tuple is the activation is never guessed: the same refusal everywhere
    for batch_mode in ("loop", "vmap"):
        with pytest.raises(TypeError, match=message):
            LayerNormGradOrder1(model, model.split).attribute(
                torch.randn(2, 4), target=0, batch_mode=batch_mode
            )
    with pytest.raises(TypeError, match=message), NormGradMonitor(model, model.split):
        model(torch.randn(2, 4))


def test_every_captum_target_form_gives_the_same_map():
    model = bn_cnn().double().eval()
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    normgrad = LayerNormGrad(model, model[4])
    expected = normgrad.attribute(images, target=torch.tensor([1, 1, 1]))
    for target in (1, torch.tensor(1), torch.tensor([1]), [1, 1, 1]):
        torch.testing.assert_close(normgrad.attribute(images, target=target), expected)
    for loss in ("output", "cross_entropy"):
        torch.testing.assert_close(
            normgrad.attribute(images, target=[2, 0, 1], loss=loss),
            torch.cat(
                [
                    normgrad.attribute(images[i : i + 1], target=t, loss=loss)
                    for i, t in enumerate([2, 0, 1])
                ]
            ),
        )


def test_tuple_targets_select_from_multidimensional_outputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    images = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    model = model.double()
    maps = LayerNormGrad(model, model[1]).attribute(images, target=(1, 2, 3), loss="output")
    activation = model[:2](images).detach().requires_grad_()
    (gradient,) = torch.autograd.grad(model[2](activation)[:, 1, 2, 3].sum(), activation)
    expected = activation.norm(dim=1, keepdim=True) * gradient.norm(dim=1, keepdim=True)
    torch.testing.assert_close(maps, expected.detach())


class TwoInputModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image_branch = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 + 2, 3)

    def forward(self, images, extra, scale):
        pooled = torch.relu(self.image_branch(images)).mean(dim=(2, 3))
        return self.head(torch.cat([pooled, extra], dim=1)) * scale


def test_tuple_inputs_and_additional_forward_args():
    model = TwoInputModel().double()
    images = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    extra = torch.randn(2, 2, dtype=torch.float64)
    maps = LayerNormGrad(model, model.image_branch).attribute(
        (images, extra), target=[0, 2], additional_forward_args=(3.0,)
    )
    activation = model.image_branch(images).detach().requires_grad_()
    outputs = model.head(torch.cat([torch.relu(activation).mean(dim=(2, 3)), extra], 1)) * 3.0
    loss = nn.functional.cross_entropy(outputs, torch.tensor([0, 2]), reduction="sum")
    (gradient,) = torch.autograd.grad(loss, activation)
    expected = activation.norm(dim=1, keepdim=True) * gradient.norm(dim=1, keepdim=True)
    torch.testing.assert_close(maps, expected.detach())


@pytest.mark.parametrize("method", METHODS)
def test_works_under_no_grad_with_inplace_relu_on_vgg(method):
    model = torchvision.models.vgg11(weights=None, num_classes=5).eval()
    images = torch.randn(1, 3, 32, 32)
    layer = model.features[3]  # a conv followed by ReLU(inplace=True)
    expected = method(model, layer).attribute(images, target=2)
    with torch.no_grad():
        under_no_grad = method(model, layer).attribute(images, target=2)
    torch.testing.assert_close(under_no_grad, expected)
    assert torch.isfinite(expected).all() and expected.sum() > 0
    # at an in-place ReLU itself, output and the next conv's input are the same activation
    at_relu = LayerNormGrad(model, model.features[4]).attribute(images, target=2)
    next_input = LayerNormGrad(model, model.features[5]).attribute(
        images, target=2, attribute_to_layer_input=True
    )
    torch.testing.assert_close(at_relu, next_input)


def test_frozen_model_and_plain_inputs_still_get_gradients():
    model = bn_cnn().eval().requires_grad_(False)
    maps = LayerNormGrad(model, model[4]).attribute(torch.randn(2, 3, 8, 8), target=0)
    assert (maps > 0).any()
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_devices(dtype, device):
    model = bn_cnn().to(device=device, dtype=dtype).eval()
    images = torch.randn(2, 3, 8, 8, device=device, dtype=dtype)
    maps = LayerNormGrad(model, model[4]).attribute(images, target=1)
    assert maps.dtype == dtype and maps.device.type == device
    reference = LayerNormGrad(model.cpu().double(), model[4]).attribute(images.cpu().double(), 1)
    torch.testing.assert_close(maps.cpu().double(), reference, rtol=1e-4, atol=1e-6)


def test_data_parallel_is_refused_clearly():
    model = bn_cnn()
    with pytest.raises(NotImplementedError, match="DataParallel"):
        LayerNormGrad(model, model[3], device_ids=[0])


def test_inference_mode_is_refused_clearly():
    model = bn_cnn().eval()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        LayerNormGrad(model, model[3]).attribute(torch.randn(1, 3, 8, 8), target=0)


def test_bad_layer_arguments_are_refused():
    model = bn_cnn()
    with pytest.raises(ValueError, match="empty list"):
        LayerNormGrad(model, [])
    with pytest.raises(TypeError, match="nn.Module or a list"):
        LayerNormGrad(model, ["0"])
