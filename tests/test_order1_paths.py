"""The plain-autograd loop of order 1 (issue 12) and what it supports or refuses (issue 9, items 5-10).

The loop must compute exactly the formula's maps; the model features that torch.func cannot run
(full backward hooks, activation checkpointing) must give the maps of the same model without them,
or be refused before any result with a message naming the module and the reason.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
import torchvision
from model_state import assert_model_unchanged, model_snapshot
from tiny_models import bn_cnn, tiny_batch, tiny_cnn
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from captum_normgrad import LayerNormGrad
from captum_normgrad.normgrad import channel_norm
from captum_normgrad.order1 import LayerNormGradAdversarial, LayerNormGradOrder1
from captum_normgrad.training import NormGradMonitor, monitor_paused

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_example_map(model, layer, x, eps, h_scale):
    """Order 1 from the formula for ONE example, four full forward-backward passes:
    ``functional_call`` with parameters that require grad and ``torch.autograd.grad``. The label is
    the top-1 class at ``theta``."""
    theta = {n: p.detach() for n, p in model.named_parameters()}
    names = list(theta)
    seen = {}

    def tap(module, args, output):
        seen["x"] = output
        seen["z"] = torch.zeros_like(output, requires_grad=True)
        return output + seen["z"]

    def loss_and_grads(params, label=None):
        leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
        logits = functional_call(model, leaves, (x,))
        label = logits.argmax(dim=1) if label is None else label
        loss = F.cross_entropy(logits, label, reduction="sum")
        *grads, g = torch.autograd.grad(loss, [*leaves.values(), seen["z"]])
        return dict(zip(names, grads)), g, seen["x"].detach(), label

    handle = layer.register_forward_hook(tap)
    try:
        first, _, _, label = loss_and_grads(theta)
        stepped = {n: theta[n] - eps * first[n] for n in names}
        v, g_stepped, x_stepped, _ = loss_and_grads(stepped, label)
        h = h_scale / torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(v[n]) for n in names])
        )
        _, g_plus, _, _ = loss_and_grads({n: theta[n] + h * v[n] for n in names}, label)
        _, g_minus, _, _ = loss_and_grads({n: theta[n] - h * v[n] for n in names}, label)
    finally:
        handle.remove()
    hessian_term = (g_plus - g_minus) / (2 * h)
    corrected = g_stepped - eps * hessian_term
    # The library's (overflow-safe, scaled) channel norm: the test is about the passes.
    return channel_norm(x_stepped) * channel_norm(corrected)


def test_loop_equals_the_naive_per_example_loop():
    """The loop skips what the formula does not need (parameter gradients in passes 3-4, the zero
    at the layer in pass 1, copies of the parameters) but rounds every number as the formula's
    operations do: equal to the last bit in float64."""
    torch.manual_seed(3)
    model = bn_cnn().double().eval()
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    for eps, h_scale in ((0.3, 0.5), (5e-4, 0.5)):
        maps = LayerNormGradOrder1(model, model[1]).attribute(
            images, eps=eps, h_scale=h_scale, batch_mode="loop"
        )
        expected = torch.cat(
            [naive_example_map(model, model[1], x, eps, h_scale) for x in images.split(1)]
        )
        torch.testing.assert_close(maps, expected, rtol=0, atol=0)


class UnusedHead(nn.Module):
    """A trainable head the forward never calls (as googlenet's aux classifiers in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = bn_cnn()
        self.aux = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def test_vmap_with_a_parameter_the_forward_never_uses():
    model = UnusedHead().double().eval()
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    attribution = LayerNormGradOrder1(model, model.body[3])
    loop = attribution.attribute(images, target=[0, 1, 2], batch_mode="loop")
    vmapped = attribution.attribute(images, target=[0, 1, 2], batch_mode="vmap")
    torch.testing.assert_close(vmapped, loop, rtol=1e-12, atol=0)


def test_googlenet_with_aux_classifiers_under_vmap():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(num_classes=3, aux_logits=True, init_weights=True).eval()
    images = torch.randn(1, 3, 40, 40)
    attribution = LayerNormGradOrder1(model, model.inception4a)
    loop = attribution.attribute(images, target=1, batch_mode="loop")
    vmapped = attribution.attribute(images, target=1, batch_mode="vmap")
    torch.testing.assert_close(vmapped, loop, rtol=1e-4, atol=1e-6 * float(loop.abs().max()))


@pytest.mark.parametrize("method", [LayerNormGradOrder1, LayerNormGradAdversarial])
@pytest.mark.parametrize("batch_mode", ["loop", "vmap"])
def test_empty_batch_gives_empty_maps_like_order_0(method, batch_mode):
    model = bn_cnn().eval()
    images = torch.randn(0, 3, 8, 8)
    maps = method(model, [model[1], model[3]]).attribute(images, batch_mode=batch_mode)
    order0 = LayerNormGrad(model, [model[1], model[3]]).attribute(images)
    assert [m.shape for m in maps] == [m.shape for m in order0] == [(0, 1, 8, 8), (0, 1, 4, 4)]


class Blocks(nn.Module):
    """Three smooth blocks; the middle one optionally checkpointed."""

    def __init__(self, checkpointed: bool | None = None) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh())
        self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())
        self.c = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())
        self.head = nn.Linear(4, 3)
        self.use_reentrant = checkpointed

    def forward(self, x: Tensor) -> Tensor:
        x = self.a(x)
        if self.use_reentrant is None:
            x = self.b(x)
        else:
            x = checkpoint(self.b, x, use_reentrant=self.use_reentrant)
        return self.head(self.c(x).mean(dim=(2, 3)))


def blocks(checkpointed: bool | None = None) -> Blocks:
    torch.manual_seed(1)
    return Blocks(checkpointed).double().eval()


def blocks_maps(model: Blocks, **kwargs) -> list[Tensor]:
    images = torch.randn(
        2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    layers = [model.a, model.b[0], model.c]
    return LayerNormGradOrder1(model, layers).attribute(images, target=[0, 2], eps=0.3, **kwargs)


@pytest.mark.parametrize("hvp", ["finite_difference", "exact"])
def test_full_backward_hook_gives_the_maps_without_it(hvp):
    expected = blocks_maps(blocks(), hvp=hvp)
    model = blocks()
    fired = []
    handle = model.b.register_full_backward_hook(lambda module, gin, gout: fired.append(1))
    before = model_snapshot(model)
    for batch_mode in ("loop", "auto"):
        for maps, reference in zip(blocks_maps(model, hvp=hvp, batch_mode=batch_mode), expected):
            # The hook's identity nodes may change the order in which the double backward sums
            # gradients (one rounding in float64), never more.
            torch.testing.assert_close(maps, reference, rtol=1e-14, atol=0)
    # The hook stays registered and fires once per backward pass that crosses the module: passes
    # 1 to 4 (finite difference), or passes 1, 2 and the double backward (exact), per example.
    assert len(fired) == 2 * 2 * (4 if hvp == "finite_difference" else 3)
    assert_model_unchanged(model, before)
    with pytest.raises(ValueError, match=r"batch_mode='vmap'.*module 'b' has a full backward hook"):
        blocks_maps(model, hvp=hvp, batch_mode="vmap")
    handle.remove()


@pytest.mark.parametrize("hvp", ["finite_difference", "exact"])
def test_non_reentrant_checkpointing_gives_the_maps_without_it(hvp):
    """The checkpointed block is recomputed during each backward: with the pass's parameters, and
    the layer inside it tapped again the same way (the loop: "auto" falls back to it)."""
    expected = blocks_maps(blocks(), hvp=hvp, batch_mode="loop")
    model = blocks(checkpointed=False)
    for maps, reference in zip(blocks_maps(model, hvp=hvp), expected):
        torch.testing.assert_close(maps, reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"batch_mode='vmap'.*torch.func.*batch_mode='loop'"):
        blocks_maps(model, hvp=hvp, batch_mode="vmap")


def test_reentrant_checkpointing_is_refused_by_name():
    model = blocks(checkpointed=True)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'b.0' runs with gradients disabled.*reentrant"):
        blocks_maps(model)
    with pytest.raises(
        ValueError, match=r"reentrant activation checkpointing.*use_reentrant=False"
    ):
        LayerNormGradOrder1(model, model.c).attribute(torch.randn(1, 3, 6, 6).double(), target=0)
    assert_model_unchanged(model, before)


def test_exact_hvp_without_a_second_derivative_is_refused_naming_the_op():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=3).eval()
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"no derivative of aten::hardsigmoid_backward"):
        LayerNormGradOrder1(model, model.features[3]).attribute(images, target=0, hvp="exact")
    maps = LayerNormGradOrder1(model, model.features[3]).attribute(images, target=0)
    assert torch.isfinite(maps).all()


def test_train_mode_batchnorm_on_one_example_says_what_to_do():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).train()
    before = model_snapshot(model)
    images = torch.randn(2, 3, 32, 32)
    for batch_mode in ("loop", "vmap"):
        with pytest.raises(ValueError, match=r"one example at a time.*BatchNorm.*model\.eval\(\)"):
            LayerNormGradOrder1(model, model.layer3).attribute(
                images, target=[0, 1], batch_mode=batch_mode
            )
    assert_model_unchanged(model, before)


def test_order1_while_a_monitor_watches_an_earlier_layer():
    """Order 1's passes are not training steps: inside monitor_paused() or not, the monitor ignores
    them, and the step open around them is recorded from the training loss's backward."""
    model = tiny_cnn(inplace=True)
    images, labels = tiny_batch()
    expected = LayerNormGrad(model, model[0]).attribute(images, target=labels)
    order1 = LayerNormGradOrder1(model, model[2]).attribute(images, target=labels)
    with NormGradMonitor(model, model[0], loss_reduction="sum") as monitor:
        outputs = model(images)
        for paused in (True, False):
            with monitor_paused() if paused else nullcontext():
                maps = LayerNormGradOrder1(model, model[2]).attribute(images, target=labels)
            torch.testing.assert_close(maps, order1, rtol=0, atol=0)
        assert monitor.latest is None
        F.cross_entropy(outputs, labels, reduction="sum").backward()
    assert monitor.steps_seen == 1
    torch.testing.assert_close(monitor.latest.maps["0"], expected, rtol=1e-12, atol=0)


def test_a_forward_inside_monitor_paused_is_not_a_step():
    model = tiny_cnn()
    images, labels = tiny_batch()
    with NormGradMonitor(model, model[2], loss_reduction="sum") as monitor:
        outputs = model(images)
        with monitor_paused():
            model(images)  # not a step: the step opened above stays open
        F.cross_entropy(outputs, labels, reduction="sum").backward()
    assert monitor.steps_seen == 1 and [step.step for step in monitor.history] == [0]
