"""The passes of NormGrad order 1 one example at a time, with plain autograd (``batch_mode="loop"``).

No torch.func transform: the parameters are leaf tensors handed to ``functional_call`` and every
gradient comes from ``torch.autograd.grad``. Whatever autograd runs works here (full backward hooks,
non-reentrant activation checkpointing, ``autograd.Function`` without ``setup_context``), and the
transforms' per-call overhead is gone. What each pass differentiates is only what it needs:

1. at ``theta``: the gradient to every trainable parameter (this forward also resolves the label,
   so no separate forward of the batch is needed);
2. at ``theta'``: the parameters' gradient ``v`` and the gradient ``g`` at the layers;
3. and 4. at ``theta +- h v``: only ``g``. The parameters do not require grad, so nothing before the
   layer enters the graph and the backward stops at the layer.

With ``hvp="exact"`` passes 3 and 4 are replaced by one double backward through pass 1's graph:
``H(theta) v`` at the layer is ``d/dz <d l/d theta, v>`` for the zero ``z`` added to the layer's
activation (the mixed second derivative, in either order).

The user's module is never stepped: ``theta`` are detached aliases of its parameters (no copy, and
the user's tensor hooks on them never fire), the other parameter sets are this module's own tensors,
reused from one example to the next.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call

from captum_normgrad._core.capture import (
    LayerRecord,
    check_each_ran_once,
    float_activation,
    kept_value,
    register_tap,
)
from captum_normgrad._order1.autograd import (
    ForwardCaller,
    Parameters,
    gradients_or_zeros,
    second_derivative,
    step_size,
)
from captum_normgrad._order1.settings import Order1Settings

__all__ = ["LoopPasses"]


class _Taps:
    """Forward hooks on the attributed layers, live for one call, switched per pass.

    In a pass that needs the gradient at the layers, each hook records the activation ``x`` and hands
    the rest of the network ``x + z``, ``z`` a zero leaf that requires grad: ``d loss / d z`` is the
    gradient at the layer (at an input: the gradient through this layer), and an in-place operation
    downstream (``ReLU(inplace=True)``) changes the new tensor, never the recorded ``x``. A recorded
    input is a copy, since the model still holds the tensor and may change it afterwards.
    """

    def __init__(self, records: Sequence[LayerRecord], at_input: bool) -> None:
        self.records = list(records)
        self.at_input = at_input
        self.tap = False
        self.forward_done = False
        self.activations: list[Tensor | None] = []
        self.zeros: list[Tensor | None] = []
        self.start_pass(False)

    def start_pass(self, tap: bool) -> None:
        self.tap = tap
        self.forward_done = False
        for record in self.records:
            record.calls = 0
        self.activations = [None] * len(self.records)
        self.zeros = [None] * len(self.records)

    def _seen(self, index: int, value: object) -> Tensor | None:
        if self.forward_done:
            # Non-reentrant checkpointing recomputes the block during the backward: the same
            # graph as the forward, the same zero added.
            zero = self.zeros[index] if self.tap else None
            return None if zero is None else value + zero
        name = self.records[index].name
        self.records[index].calls += 1
        float_activation(value, name, "input" if self.at_input else "output")
        if not torch.is_grad_enabled():
            raise ValueError(
                f"layer '{name}' runs with gradients disabled inside the model's forward (under "
                "reentrant activation checkpointing, torch.utils.checkpoint(use_reentrant=True), "
                "or torch.no_grad()), so no gradient can reach it; use use_reentrant=False or "
                "attribute a layer outside that block"
            )
        if value.dim() == 0 or value.shape[0] != 1:
            raise ValueError(
                f"layer '{name}' has an activation of shape {tuple(value.shape)} for one example; "
                "order 1 needs batch-first activations"
            )
        if not self.tap:
            return None
        if self.records[index].calls > 1:  # refused by check_each_ran_once after the forward
            return None
        self.activations[index] = kept_value(value, self.at_input)
        self.zeros[index] = torch.zeros_like(value, requires_grad=True)
        return value + self.zeros[index]

    @contextmanager
    def registered(self) -> Iterator[_Taps]:
        handles = []
        try:
            for index, record in enumerate(self.records):
                tap = functools.partial(self._seen, index)
                handles.append(register_tap(record.layer, self.at_input, tap))
            yield self
        finally:
            for handle in handles:
                handle.remove()


class _Within(nn.Module):
    """A module whose forward runs any body: ``functional_call`` on it replaces the parameters of
    ``caller`` (named ``caller.<name>``) for as long as the body runs."""

    def __init__(self, caller: ForwardCaller) -> None:
        super().__init__()
        self.caller = caller

    def forward(self, body: Callable[[], object]) -> object:
        return body()


class LoopPasses:
    """The passes for one example at a time.

    Args:
        caller: the :class:`ForwardCaller` around the user's model.
        theta: the trainable parameters (detached, named as ``caller`` names them).
        buffers: the model's buffers; each pass works on copies (BatchNorm in training mode updates
            its running statistics, a forward may reassign a buffer), which also restores their
            bindings after the pass.
        records: one per attributed layer (its module and name).
        at_input: tap the layers' inputs instead of their outputs.
        loss: ``loss(outputs, target) -> (1,)``.
    """

    def __init__(
        self,
        caller: ForwardCaller,
        theta: Parameters,
        buffers: dict[str, Tensor],
        records: Sequence[LayerRecord],
        at_input: bool,
        loss: Callable[[Tensor, object], Tensor],
    ) -> None:
        self.caller = caller
        self.within = _Within(caller)
        self.theta = theta
        self.buffers = buffers
        self.taps = _Taps(records, at_input)
        self.loss = loss
        # One parameter-sized set of tensors serves theta', then theta + h v and theta - h v, for
        # every example: a fresh model-sized tensor costs several in-place updates on CPU.
        self.moved = {name: torch.empty_like(t) for name, t in theta.items()}
        self.leaves = {name: t.requires_grad_() for name, t in self._aliases(theta).items()}

    @staticmethod
    def _aliases(tensors: Parameters) -> Parameters:
        return {name: t.detach() for name, t in tensors.items()}

    def _at(self, params: Parameters, body: Callable[[], object]) -> object:
        """Run ``body`` with the model's parameters replaced by ``params`` and its buffers by
        copies: its forward AND its backward, so that a checkpointed block recomputed during the
        backward sees the same parameters."""
        state = {f"caller.{name}": t for name, t in params.items()}
        state.update({f"caller.{name}": b.clone() for name, b in self.buffers.items()})
        return functional_call(self.within, state, (body,), strict=False)

    def _forward(self, forward_args: tuple, tap: bool) -> Tensor:
        """The model's outputs at the current parameters, the layer hooks tapping when ``tap``."""
        self.taps.start_pass(tap)
        outputs = self.caller(*forward_args)
        check_each_ran_once(self.taps.records)
        self.taps.forward_done = True
        return outputs

    def terms(
        self,
        forward_args: tuple,
        resolve_target: Callable[[Tensor], object],
        settings: Order1Settings,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``x(theta')`` and ``g(theta') - lr H(theta) v`` at each layer for one example, whose
        forward arguments (batch dimension 1) are ``forward_args``.

        ``resolve_target(outputs at theta)`` gives the target of the loss (the top-1 class when the
        user gave none); it is called on pass 1's outputs, detached.
        """
        names = list(self.leaves)
        learning_rate, exact_hvp = settings.learning_rate, settings.exact_hvp

        def at_theta() -> tuple[list[Tensor], list[Tensor]]:
            outputs = self._forward(forward_args, tap=exact_hvp)
            target = resolve_target(outputs.detach())
            loss = self.loss(outputs, target).sum()
            del outputs
            first = gradients_or_zeros(loss, list(self.leaves.values()), create_graph=exact_hvp)
            del loss  # with create_graph, `first` keeps the graph the double backward needs
            zeros_at_theta = list(self.taps.zeros)
            with torch.no_grad():  # theta' = theta - lr * grad, rounded as the formula reads
                for name, gradient in zip(names, first):
                    moved = torch.mul(gradient.detach(), learning_rate, out=self.moved[name])
                    torch.sub(self.theta[name], moved, out=moved)
            stepped = {name: t.requires_grad_() for name, t in self._aliases(self.moved).items()}

            def at_stepped() -> tuple[list[Tensor], list[Tensor]]:
                loss = self.loss(self._forward(forward_args, tap=True), target).sum()
                return list(self.taps.activations), gradients_or_zeros(
                    loss, [*stepped.values(), *self.taps.zeros]
                )

            activations, found = self._at(stepped, at_stepped)
            direction = dict(zip(names, found[: len(names)]))
            gradients = found[len(names) :]
            if exact_hvp:
                directions = [direction[name] for name in names]
                hessian_terms = second_derivative(first, directions, zeros_at_theta)
            else:
                del first
                h = step_size(direction, settings.h_scale)
                plus = self._layer_gradients(direction, h, forward_args, target)
                minus = self._layer_gradients(direction, -h, forward_args, target)
                hessian_terms = [(p - m) / (2 * h) for p, m in zip(plus, minus)]
            corrected = [g - learning_rate * hv for g, hv in zip(gradients, hessian_terms)]
            return activations, corrected

        return self._at(self.leaves, at_theta)

    def _layer_gradients(
        self, direction: Parameters, step: Tensor, forward_args: tuple, target: object
    ) -> list[Tensor]:
        """``g(theta + step * direction)``: the parameters do not require grad, so the graph (and
        the backward) starts at the layers."""
        with torch.no_grad():
            for name, moved in self.moved.items():
                moved.copy_(direction[name]).mul_(step).add_(self.theta[name])

        def at_moved() -> list[Tensor]:
            loss = self.loss(self._forward(forward_args, tap=True), target).sum()
            return gradients_or_zeros(loss, self.taps.zeros)

        return self._at(self.moved, at_moved)

    @contextmanager
    def hooks(self) -> Iterator[LoopPasses]:
        with self.taps.registered():
            yield self
