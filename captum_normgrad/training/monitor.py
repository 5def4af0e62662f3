"""NormGrad maps for free during training: read from the training step's own forward and backward.

Order-0 NormGrad needs, at a layer, the activation ``x`` and the gradient ``g`` of the loss with
respect to it. An ordinary training step computes both: the forward pass produces ``x`` and
``loss.backward()`` produces ``g`` on its way to the weights. :class:`NormGradMonitor` takes them as
they go by (a forward hook that stores ``||x_u||`` and puts a gradient hook on the output), so the
maps cost two channel norms per layer and no extra pass.

Batch size. A mean-reduced loss ``(1/N) sum_i l_i`` (PyTorch's default) backpropagates ``g / N``,
so the raw map of an example would shrink as its batch grows. With ``loss_reduction="mean"`` the
monitor multiplies every map by the batch size ``N``, which gives exactly the map of the summed
loss: the map of ``LayerNormGrad`` (cross-entropy summed), independent of the batch. Use
``loss_reduction="sum"`` when the loss is already summed. Any other constant factor in the loss
(gradient accumulation's ``1/k``, mixed-precision loss scaling) scales every map alike.

Which backward pass. A gradient hook fires in *every* backward pass through the layer. The maps are
meant to come from ``loss.backward()``, so the extra gradient computations of a step (a gradient
penalty's ``torch.autograd.grad``) must run inside :func:`monitor_paused`; this package's
saliency losses do that for their own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from captum_normgrad._core.capture import float_activation, layer_name
from captum_normgrad._core.hidden_states import activation_in
from captum_normgrad._core.layer_map import channel_norm
from captum_normgrad._core.layouts import (
    Layout,
    ReshapeTransform,
    recording_grids,
    resolve_layouts,
)
from captum_normgrad._core.pause import ignored_while_paused, is_paused, monitor_paused

__all__ = ["MonitoredStep", "NormGradMonitor", "monitor_paused"]


@dataclass(frozen=True)
class MonitoredStep:
    """The maps of one recorded training step.

    Attributes:
        step: the step's index, counting every forward pass of the model with gradients enabled
            since the monitor was entered (0 is the first).
        maps: layer name -> detached ``(N, 1, *S)`` map, in the order the layers were given.
    """

    step: int
    maps: dict[str, Tensor]


@dataclass
class _PendingStep:
    """A recorded step between its forward pass and the end of its backward pass."""

    step: int
    activation_norms: dict[int, Tensor] = field(default_factory=dict)
    maps: dict[int, Tensor] = field(default_factory=dict)
    handles: list[RemovableHandle] = field(default_factory=list)

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class NormGradMonitor:
    r"""Record order-0 NormGrad maps ``||x_u|| * ||g_u||`` at chosen layers while a model trains.

    A context manager: inside the ``with`` block every training step (a forward pass of ``model``
    with gradients enabled, then ``loss.backward()``) yields one :class:`MonitoredStep`, handed to
    ``callback`` when the backward pass reaches the last monitored layer and kept in
    :attr:`history` (the last ``history`` steps only, so memory stays bounded). Forward passes
    under ``torch.no_grad()`` (validation) are neither counted nor recorded. Every hook is removed
    when the block ends, also when it raises. The monitor runs no pass of its own and changes no
    gradient: the optimiser sees exactly what it would without it.

    Args:
        model: the module the training step calls; each call of it starts a step.
        layers: the submodules of ``model`` to record, each run exactly once per forward pass.
        every: record only every ``every``-th step (steps ``0, every, 2 * every, ...``); the
            others cost one integer comparison per layer.
        callback: called with each recorded :class:`MonitoredStep`, during ``loss.backward()``.
        history: how many recorded steps to keep in :attr:`history` (0 keeps none; then a
            ``callback`` is required, or the maps would be thrown away).
        loss_reduction: how the training loss reduces over the batch. ``"mean"`` (PyTorch's
            default) multiplies the maps by the batch size to undo the ``1/N`` in the gradient,
            so maps equal those of ``LayerNormGrad`` with the loss summed, whatever the batch
            size; ``"sum"`` leaves them as they are.
        reshape_transform: as for :class:`~captum_normgrad.LayerNormGrad` (applied to the
            activation and its gradient alike; by default read from a torchvision ViT / Swin /
            ConvNeXt, and an activation whose channels look last is refused).

    Raises:
        ValueError: bad arguments, or a layer that is not a submodule of ``model``.
        RuntimeError: during training, a layer that did not run, ran twice, or whose output does
            not require grad (the backward pass would never reach it).

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with NormGradMonitor(model, [model.layer2, model.layer3], every=10) as monitor:
        ...     for images, labels in loader:
        ...         optimiser.zero_grad()
        ...         F.cross_entropy(model(images), labels).backward()
        ...         optimiser.step()
        >>> monitor.latest.maps["layer3"].shape     # (N, 1, H/16, W/16)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: nn.Module | Sequence[nn.Module],
        *,
        every: int = 1,
        callback: Callable[[MonitoredStep], None] | None = None,
        history: int = 1,
        loss_reduction: Literal["mean", "sum"] = "mean",
        reshape_transform: ReshapeTransform | Sequence[ReshapeTransform | None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        layers = [layers] if isinstance(layers, nn.Module) else list(layers)
        _check_layers(model, layers)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be a non-negative integer, got {history!r}")
        if history == 0 and callback is None:
            raise ValueError("history=0 without a callback would throw every map away")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.model = model
        self.layers = layers
        self.names = [layer_name(model, layer) for layer in layers]
        self.layouts = resolve_layouts(model, layers, reshape_transform)
        self.every = every
        self.callback = callback
        self.loss_reduction = loss_reduction
        self._history: deque[MonitoredStep] = deque(maxlen=history)
        self._handles: list[RemovableHandle] = []
        self._grids = ExitStack()  # the patch grids of token layers, recorded while entered
        self._pending: _PendingStep | None = None
        self._recording = False
        self.steps_seen = 0

    @property
    def history(self) -> list[MonitoredStep]:
        """The kept recorded steps, oldest first."""
        return list(self._history)

    @property
    def latest(self) -> MonitoredStep | None:
        """The most recent recorded step, or ``None`` before the first one completes."""
        return self._history[-1] if self._history else None

    def __enter__(self) -> NormGradMonitor:
        if self._handles:
            raise RuntimeError("this NormGradMonitor is already active; enter it once at a time")
        self.steps_seen = 0
        self._pending = None
        self._recording = False
        try:
            # First, so that a token layer's patch grid is known when its hook runs.
            self._grids.enter_context(recording_grids(self.layouts))
            self._handles.append(self.model.register_forward_pre_hook(self._start_step))
            for index, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_hook(self._layer_hook(index)))
            self._handles.append(self.model.register_forward_hook(self._end_forward))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self._close_pending()
        finally:
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._grids.close()
        if self._pending is not None:
            self._pending.remove_hooks()
            self._pending = None
        self._recording = False

    def _close_pending(self) -> None:
        """Settle the step whose backward pass did not reach every layer.

        No gradient at all: its forward pass had no backward (evaluation with gradients on, an
        exception), so it is dropped. Some layers only: their outputs do not reach the loss, so
        their gradient is zero, and so is their map (as ``LayerNormGrad`` has it).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.remove_hooks()
        if pending.maps:
            for index, activation_norm in pending.activation_norms.items():
                pending.maps.setdefault(index, torch.zeros_like(activation_norm))
            self._finish(pending)

    @ignored_while_paused
    def _start_step(self, module: nn.Module, args: tuple) -> None:
        self._recording = False
        if not torch.is_grad_enabled() or is_paused():
            return
        self._close_pending()
        step = self.steps_seen
        self.steps_seen += 1
        if step % self.every == 0:
            self._pending = _PendingStep(step)
            self._recording = True

    def _layer_hook(self, index: int) -> Callable[[nn.Module, tuple, object], None]:
        @ignored_while_paused
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            pending = self._pending
            if not self._recording or pending is None:
                return
            name = self.names[index]
            if index in pending.activation_norms:
                raise RuntimeError(
                    f"layer '{name}' ran more than once in one forward pass; its activation is "
                    "ambiguous. Monitor a module that runs once per pass"
                )
            output = activation_in(module, output)
            _check_output(output, args, name)
            # Taken now, before any in-place operation downstream can change the activation; the
            # gradient hook below likewise receives the gradient of the value seen here.
            layout = self.layouts[index].frozen()  # this forward's grid, for its backward too
            pending.activation_norms[index] = channel_norm(layout.channels_first(output.detach()))
            pending.handles.append(
                output.register_hook(self._gradient_hook(pending, index, layout))
            )

        return hook

    @ignored_while_paused
    def _end_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        pending = self._pending
        if not self._recording or pending is None:
            return
        self._recording = False
        missing = [n for i, n in enumerate(self.names) if i not in pending.activation_norms]
        if missing:
            pending.remove_hooks()
            self._pending = None
            raise RuntimeError(
                f"layer(s) {missing} did not run during the forward pass of the model; monitor "
                "modules the model actually calls"
            )

    def _gradient_hook(
        self, pending: _PendingStep, index: int, layout: Layout
    ) -> Callable[[Tensor], None]:
        def hook(gradient: Tensor) -> None:
            if is_paused():
                return
            with torch.no_grad():
                activation_norm = pending.activation_norms[index]
                layout.check_patches_reach_loss(gradient)
                layer_map = activation_norm * channel_norm(layout.channels_first(gradient.detach()))
                if self.loss_reduction == "mean":
                    layer_map = layer_map * activation_norm.shape[0]
            pending.maps[index] = layer_map
            if len(pending.maps) == len(self.layers):
                self._finish(pending)

        return hook

    def _finish(self, pending: _PendingStep) -> None:
        pending.remove_hooks()
        if self._pending is pending:
            self._pending = None
        recorded = MonitoredStep(
            pending.step, {self.names[i]: pending.maps[i] for i in range(len(self.layers))}
        )
        self._history.append(recorded)
        if self.callback is not None:
            self.callback(recorded)


def _check_layers(model: nn.Module, layers: list[nn.Module]) -> None:
    if not layers:
        raise ValueError("give at least one layer to monitor")
    submodules = {id(module) for module in model.modules()}
    for layer in layers:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layers must be nn.Modules, got {type(layer).__name__}")
        if id(layer) not in submodules:
            raise ValueError(
                f"{type(layer).__name__} layer is not a submodule of the model; the monitor "
                "counts steps by the model's forward passes, so it must contain the layers"
            )
    if len({id(layer) for layer in layers}) != len(layers):
        raise ValueError("the same layer is listed twice")


def _check_output(output: object, args: tuple, name: str) -> None:
    float_activation(output, name)
    if not output.requires_grad:
        raise RuntimeError(
            f"the output of layer '{name}' does not require grad (everything up to it is frozen), "
            "so loss.backward() never computes its gradient; monitor a layer at or after the "
            "first trainable one"
        )
    if any(output is arg for arg in args):
        raise RuntimeError(
            f"layer '{name}' returns its input unchanged, so the gradient there would include "
            "every other use of that tensor; monitor the module that produces it"
        )
