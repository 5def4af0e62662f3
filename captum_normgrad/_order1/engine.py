"""One driver for order 1's passes, whichever mode runs them.

A mode is a :class:`Passes`: hooks that live for the call, and the per-layer terms
``x(theta')`` and ``g(theta') - lr H(theta) v`` for one chunk of examples (one example in the loop,
a chunk of them in the factored and the vmapped passes). :func:`run_passes` does the rest once for
every mode: the chunks, the per-example slices of the inputs, arguments and target, the labels, the
check of the first chunk, and the concatenation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import Tensor, nn

from captum_normgrad._core.captum import TargetType
from captum_normgrad._core.capture import LayerRecord, layer_name
from captum_normgrad._core.front_door import full_precision
from captum_normgrad._core.model_state import preserved_buffers
from captum_normgrad._core.pause import monitor_paused
from captum_normgrad._order1.autograd import ForwardCaller, Parameters, differentiable_attention
from captum_normgrad._order1.examples import (
    is_per_example,
    one_example_at_a_time,
    slice_examples,
    target_of_examples,
)
from captum_normgrad._order1.factored.passes import (
    FactoredPasses,
    FactoredUnsupported,
    trainable_modules,
)
from captum_normgrad._order1.loop import LoopPasses
from captum_normgrad._order1.plan import BatchMode, Plan, balanced_chunks, plan_call
from captum_normgrad._order1.settings import Order1Settings
from captum_normgrad._order1.vmap import (
    VmapPasses,
    beyond_torch_func,
    check_batch_first,
    layers_at_theta,
)
from captum_normgrad.losses import (
    LossSpec,
    cross_entropy_of_labels,
    loss_labels,
    per_example_loss,
)

__all__ = ["Passes", "empty_records", "example_loss", "order1_records", "run_passes"]

Terms = tuple[list[Tensor], list[Tensor]]


class Passes(Protocol):
    """What a batch mode provides: the passes of order 1 for one chunk of examples."""

    def hooks(self) -> AbstractContextManager[object]:
        """The hooks the passes need, registered for the whole call and removed when it ends."""
        ...

    def terms(
        self,
        forward_args: tuple,
        resolve_target: Callable[[Tensor], object],
        settings: Order1Settings,
    ) -> Terms:
        """Per layer, ``x(theta')`` and ``g(theta') - lr H(theta) v`` for the chunk whose forward
        arguments (batch first) are ``forward_args``. ``resolve_target(outputs at theta)`` gives
        the target of the loss, called once per chunk before any backward."""
        ...


def example_loss(loss: LossSpec) -> Callable[[Tensor, object], Tensor]:
    """The loss every mode's passes call, ``(outputs, target) -> (B,)``: cross-entropy on labels
    resolved (and validated) beforehand by ``loss_labels``, or the user's callable with its
    result checked."""
    if loss == "cross_entropy":
        return cross_entropy_of_labels

    def callable_loss(outputs: Tensor, target: TargetType) -> Tensor:
        return per_example_loss(outputs, target, loss)

    return callable_loss


def _target_resolver(
    target: TargetType, loss: LossSpec, num_examples: int
) -> Callable[[int, int], Callable[[Tensor], object]]:
    """``(start, stop) -> resolve_target`` for the chunk of examples ``start:stop``.

    On the first chunk the batch's target is checked against the loss, before any backward, with
    the first example's outputs standing for every example's; with cross-entropy the labels of the
    whole batch come from it, or, where they depend on each example's own prediction (no target:
    its top-1 class; a segmenter's class target: the pixels it predicts as the class), from each
    chunk's outputs at ``theta``.
    """
    labels: Tensor | None = None

    def for_chunk(start: int, stop: int) -> Callable[[Tensor], object]:
        def resolve_target(outputs: Tensor) -> object:
            nonlocal labels
            if start == 0:
                # (outputs are a tensor: ForwardCaller explains them through the front door)
                first = outputs if stop - start == 1 else outputs[:1]
                batch_outputs = first.repeat(num_examples, *[1] * (first.dim() - 1))
                per_example_loss(batch_outputs, target, loss)
                if loss == "cross_entropy" and target is not None and outputs.dim() == 2:
                    labels = loss_labels(batch_outputs, target)
            chunk_target = target_of_examples(target, start, stop, num_examples)
            if loss != "cross_entropy":
                return chunk_target
            if labels is None:
                return loss_labels(outputs, chunk_target, first_example=start)
            return labels[start:stop]

        return resolve_target

    return for_chunk


def run_passes(
    passes: Passes,
    plan: Plan,
    inputs: tuple[Tensor, ...],
    args: tuple,
    target: TargetType,
    loss: LossSpec,
    settings: Order1Settings,
    check_first_chunk: Callable[[Sequence[Tensor], Sequence[Tensor]], None],
) -> Terms:
    """The passes on every chunk of examples; per layer, the batch's ``x(theta')`` and corrected
    gradient. ``check_first_chunk(activations, corrected)`` runs on the first chunk's terms, so
    that a problem it finds is refused before the other chunks' passes run."""
    num_examples = inputs[0].shape[0]
    per_example = [is_per_example(a, num_examples) for a in args]
    resolver = _target_resolver(target, loss, num_examples)
    activations, corrected = [], []
    with passes.hooks():
        for start, stop in balanced_chunks(num_examples, plan.chunk_size):
            chunk_activations, chunk_corrected = passes.terms(
                slice_examples(inputs, args, per_example, start, stop),
                resolver(start, stop),
                settings,
            )
            activations.append(chunk_activations)
            corrected.append(chunk_corrected)
            if start == 0:
                check_first_chunk(chunk_activations, chunk_corrected)
    return (
        [torch.cat(parts) for parts in zip(*activations)],
        [torch.cat(parts) for parts in zip(*corrected)],
    )


def empty_records(
    forward_func: Callable[..., Tensor],
    model: nn.Module,
    layers: Sequence[nn.Module],
    at_input: bool,
    inputs: tuple[Tensor, ...],
    target: TargetType,
    args: tuple,
    loss: LossSpec,
) -> list[LayerRecord]:
    """An empty batch: one forward pass gives each layer's shape, and the maps are ``(0, 1, *S)``
    as for order 0."""
    records, outputs = layers_at_theta(forward_func, model, layers, at_input, inputs, args)
    per_example_loss(outputs, target, loss)
    check_batch_first(records, 0)
    for record in records:
        record.activation = record.activation.detach()
        record.gradient = torch.zeros_like(record.activation)
    return records


def order1_records(
    *,
    caller: ForwardCaller,
    forward_func: Callable[..., Tensor],
    layers: Sequence[nn.Module],
    theta: Parameters,
    inputs: tuple[Tensor, ...],
    target: TargetType,
    args: tuple,
    at_input: bool,
    loss: LossSpec,
    settings: Order1Settings,
    batch_mode: BatchMode,
    chunk_size: int | None,
    layer_bytes: dict[tuple, int | None],
    check_first_chunk: Callable[[Sequence[Tensor], Sequence[Tensor]], None],
) -> list[LayerRecord]:
    """Each layer's record with ``x(theta')`` as its activation and the corrected gradient as its
    gradient, from the passes the :class:`Plan` chooses; under ``batch_mode="auto"`` the loop
    computes the same maps where the factored or the vmapped passes turn out not to run the
    model. ``layer_bytes``: the planner's cache (:func:`plan_call`), kept by the caller."""
    model = caller.model
    if inputs[0].shape[0] == 0:
        return empty_records(forward_func, model, layers, at_input, inputs, target, args, loss)
    plan = plan_call(
        batch_mode,
        chunk_size,
        caller,
        forward_func,
        inputs,
        args,
        loss,
        sum(p.numel() * p.element_size() for p in theta.values()),
        layer_bytes,
    )
    records = [LayerRecord(layer, layer_name(model, layer), at_input=at_input) for layer in layers]
    buffers = {name: b.detach() for name, b in caller.named_buffers()}

    def run(passes: Passes, plan: Plan) -> list[LayerRecord]:
        activations, corrected = run_passes(
            passes, plan, inputs, args, target, loss, settings, check_first_chunk
        )
        for record, activation, gradient in zip(records, activations, corrected):
            record.activation = activation
            record.gradient = gradient
        return records

    # The passes are not training steps: any NormGradMonitor on the model ignores them.
    with (
        # A forward that rebinds its buffers (self.ema = ...) is undone, as for order 0.
        preserved_buffers([model]),
        one_example_at_a_time(model),
        monitor_paused(),
        torch.enable_grad(),
        # The fused attention kernels have no vmap rule and no second derivative.
        differentiable_attention(settings.exact_hvp or plan.mode == "vmap"),
        # A difference of gradients eps / (2h) apart: beyond what an autocast dtype resolves.
        full_precision(inputs[0].device),
    ):
        if plan.mode == "factored":
            try:
                passes = FactoredPasses(
                    caller, trainable_modules(model), records, at_input, example_loss(loss)
                )
                return run(passes, plan)
            except FactoredUnsupported:
                if plan.asked != "auto":
                    raise
                # "auto": the loop computes the same maps one example at a time.
        if plan.mode == "vmap":
            try:
                passes = VmapPasses(
                    caller,
                    forward_func,
                    layers,
                    at_input,
                    example_loss(loss),
                    theta,
                    buffers,
                    args,
                    target,
                    cross_entropy=loss == "cross_entropy",
                    num_examples=inputs[0].shape[0],
                )
                return run(passes, plan)
            except NotImplementedError as error:
                missing = re.search(r"forward AD with (\S+)", str(error))
                if missing is None:
                    raise
                raise ValueError(
                    "hvp='exact' differentiates the model's gradient a second time (forward "
                    "over reverse under batch_mode='vmap'), and PyTorch has no forward-mode "
                    f"derivative of {missing.group(1)}, which this model uses; use "
                    "hvp='finite_difference' (the paper's)"
                ) from error
            except RuntimeError as error:
                if not beyond_torch_func(error):
                    raise
                if plan.asked == "vmap":
                    raise ValueError(
                        "batch_mode='vmap' runs the passes under torch.func.vmap, which cannot "
                        f"run this model ({error}); use batch_mode='loop' (same maps)"
                    ) from error
                # "auto": the loop computes the same maps with plain autograd.
        passes = LoopPasses(caller, theta, buffers, records, at_input, example_loss(loss))
        return run(passes, dataclasses.replace(plan, mode="loop", chunk_size=1))
