"""NormGradMonitor: maps from the training step's own passes, equal to LayerNormGrad's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_model_unchanged, model_snapshot
from torch import nn

from captum_normgrad import LayerNormGrad
from captum_normgrad.training import NormGradMonitor, monitor_paused

pytestmark = pytest.mark.usefixtures("one_thread")


class PassCounter(torch.autograd.Function):
    """Identity that counts the forward and backward passes through it."""

    forwards = 0
    backwards = 0

    @staticmethod
    def forward(ctx, tensor):
        PassCounter.forwards += 1
        return tensor.clone()

    @staticmethod
    def backward(ctx, gradient):
        PassCounter.backwards += 1
        return gradient


class SmallNet(nn.Module):
    """BatchNorm in train mode, in-place ReLUs after the monitored layers, a 2-D head."""

    def __init__(self, count_passes: bool = False) -> None:
        super().__init__()
        self.count_passes = count_passes
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.conv1(x)
        if self.count_passes:
            x = PassCounter.apply(x)
        x = self.relu1(self.bn1(x))
        x = self.relu2(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def _layers(model):
    return [model.bn1, model.conv2, model.fc]


def _batch(n, dtype=torch.float64):
    return torch.randn(n, 3, 8, 8, dtype=dtype), torch.arange(n) % 3


def _training_step(model, images, labels, reduction="mean"):
    F.cross_entropy(model(images), labels, reduction=reduction).backward()


def test_map_equals_layer_normgrad_exactly_with_a_power_of_two_batch():
    # Undoing 1/N multiplies by a power of two, exact in floating point: the maps are bitwise equal.
    model = SmallNet().double().train()
    images, labels = _batch(4)
    expected = LayerNormGrad(model, _layers(model)).attribute(images, target=labels)
    with NormGradMonitor(model, _layers(model)) as monitor:
        _training_step(model, images, labels)
    assert list(monitor.latest.maps) == ["bn1", "conv2", "fc"]
    for reference, layer_map in zip(expected, monitor.latest.maps.values()):
        assert layer_map.shape == reference.shape
        assert torch.equal(layer_map, reference)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_map_equals_layer_normgrad_for_any_batch_size(reduction):
    model = SmallNet().double().train()
    images, labels = _batch(3)
    expected = LayerNormGrad(model, _layers(model)).attribute(images, target=labels)
    with NormGradMonitor(model, _layers(model), loss_reduction=reduction) as monitor:
        _training_step(model, images, labels, reduction)
    for reference, layer_map in zip(expected, monitor.latest.maps.values()):
        torch.testing.assert_close(layer_map, reference, rtol=1e-12, atol=0)


def test_mean_reduced_maps_do_not_depend_on_the_batch():
    model = SmallNet().double().eval()  # eval: BatchNorm does not mix the examples
    images, labels = _batch(6)
    with NormGradMonitor(model, model.conv2, history=2) as monitor:
        _training_step(model, images[:2], labels[:2])
        _training_step(model, images, labels)
    alone, in_batch = (step.maps["conv2"] for step in monitor.history)
    torch.testing.assert_close(in_batch[:2], alone, rtol=1e-12, atol=0)
    raw_ratio = (in_batch[:2] / 6) / (alone / 2)  # what the gradients alone would give
    assert not torch.allclose(raw_ratio, torch.ones_like(raw_ratio))


def test_no_extra_pass_and_the_training_gradients_are_unchanged():
    images, labels = _batch(4)
    model = SmallNet(count_passes=True).double().train()
    plain = SmallNet(count_passes=True).double().train()
    plain.load_state_dict(model.state_dict())
    PassCounter.forwards = PassCounter.backwards = 0
    for _ in range(3):
        _training_step(plain, images, labels)
    assert (PassCounter.forwards, PassCounter.backwards) == (3, 3)
    PassCounter.forwards = PassCounter.backwards = 0
    with NormGradMonitor(model, _layers(model), history=3) as monitor:
        for _ in range(3):
            _training_step(model, images, labels)
    assert (PassCounter.forwards, PassCounter.backwards) == (3, 3)
    assert [step.step for step in monitor.history] == [0, 1, 2]
    for (name, parameter), reference in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(parameter.grad, reference.grad), name
    for buffer, reference in zip(model.buffers(), plain.buffers()):
        assert torch.equal(buffer, reference)


def test_no_hook_left_after_exit_or_an_exception():
    model = SmallNet().double().eval()  # eval: the forward passes themselves change nothing
    images, labels = _batch(4)
    before = model_snapshot(model)
    with NormGradMonitor(model, _layers(model)):
        model(images)
    assert_model_unchanged(model, before)
    with pytest.raises(KeyError, match="boom"), NormGradMonitor(model, _layers(model)):
        model(images)
        raise KeyError("boom")
    assert_model_unchanged(model, before)


def test_a_backward_after_exit_records_nothing():
    model = SmallNet().double().train()
    images, labels = _batch(4)
    recorded = []
    with NormGradMonitor(model, _layers(model), callback=recorded.append) as monitor:
        loss = F.cross_entropy(model(images), labels)
    loss.backward()  # the gradient hooks on this step's activations were removed on exit
    assert recorded == [] and monitor.history == []


def test_every_k_steps_and_no_grad_forwards_are_not_steps():
    model = SmallNet().double().train()
    images, labels = _batch(4)
    recorded = []
    with NormGradMonitor(model, model.conv2, every=3, callback=recorded.append, history=0):
        for _ in range(7):
            _training_step(model, images, labels)
            with torch.no_grad():
                model(images)
    assert [step.step for step in recorded] == [0, 3, 6]


def test_history_is_bounded_and_the_callback_sees_every_step():
    model = SmallNet().double().train()
    images, labels = _batch(4)
    recorded = []
    with NormGradMonitor(model, model.conv2, callback=recorded.append, history=2) as monitor:
        for _ in range(5):
            _training_step(model, images, labels)
    assert [step.step for step in recorded] == [0, 1, 2, 3, 4]
    assert [step.step for step in monitor.history] == [3, 4]
    assert monitor.latest is monitor.history[-1]
    assert all(not m.requires_grad for m in monitor.latest.maps.values())


def test_a_forward_without_backward_is_dropped():
    model = SmallNet().double().train()
    images, labels = _batch(4)
    with NormGradMonitor(model, model.conv2, history=5) as monitor:
        model(images)  # evaluation with gradients enabled: counted, but never backpropagated
        _training_step(model, images, labels)
    assert [step.step for step in monitor.history] == [1]


def test_extra_gradient_computations_inside_monitor_paused_are_ignored():
    model = SmallNet().double().train()
    images, labels = _batch(4)
    expected = LayerNormGrad(model, model.conv2).attribute(images, target=labels)
    with NormGradMonitor(model, model.conv2) as monitor:
        outputs = model(images)
        with monitor_paused():
            torch.autograd.grad(outputs[:, 0].sum(), model.conv1.weight, retain_graph=True)
        assert monitor.latest is None
        F.cross_entropy(outputs, labels).backward()
    torch.testing.assert_close(monitor.latest.maps["conv2"], expected, rtol=1e-12, atol=0)


class WithUnusedBranch(SmallNet):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        self.unused(x)  # computed, never reaches the loss
        x = self.relu2(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_a_layer_the_loss_does_not_reach_gets_a_zero_map():
    model = WithUnusedBranch().double().train()
    images, labels = _batch(4)
    with NormGradMonitor(model, [model.conv2, model.unused]) as monitor:
        _training_step(model, images, labels)
        assert monitor.latest is None  # delivered when the step is known to be over
    maps = monitor.latest.maps
    assert maps["conv2"].abs().sum() > 0
    assert torch.equal(maps["unused"], torch.zeros(4, 1, 8, 8, dtype=torch.float64))


def test_clear_errors():
    model = SmallNet().double().train()
    images, labels = _batch(4)
    with pytest.raises(ValueError, match="not a submodule"):
        NormGradMonitor(model, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="every"):
        NormGradMonitor(model, model.conv2, every=0)
    with pytest.raises(ValueError, match="throw every map away"):
        NormGradMonitor(model, model.conv2, history=0)
    with pytest.raises(ValueError, match="loss_reduction"):
        NormGradMonitor(model, model.conv2, loss_reduction="none")
    with pytest.raises(ValueError, match="twice"):
        NormGradMonitor(model, [model.conv2, model.conv2])

    shared = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()).double()
    twice = nn.Sequential(shared, shared)
    with pytest.raises(RuntimeError, match="more than once"), NormGradMonitor(twice, shared[0]):
        twice(images)

    for parameter in model.conv1.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(RuntimeError, match="'conv1' does not require grad"):
        with NormGradMonitor(model, model.conv1):
            model(images)


def test_a_layer_that_did_not_run_is_named():
    model = SmallNet().double().train()
    model.spare = nn.Conv2d(3, 3, 1)
    images, _ = _batch(4)
    with pytest.raises(RuntimeError, match="spare"), NormGradMonitor(model, model.spare):
        model(images)
    assert not model.spare._forward_hooks and not model._forward_pre_hooks


def test_entering_an_active_monitor_twice_is_refused():
    model = SmallNet().double()
    monitor = NormGradMonitor(model, model.conv2)
    with monitor, pytest.raises(RuntimeError, match="already active"):
        monitor.__enter__()
