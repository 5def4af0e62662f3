"""The passes of NormGrad order 1 for a chunk of examples at once (``batch_mode="factored"``).

Each pass is ONE batched forward and backward of the user's model at the shared parameters
``theta``; forward hooks on every layer with parameters add each example's own update, kept as
factors (:mod:`captum_normgrad._order1.factored.rules`), or run the layer with it. So the examples share
the batch's kernels while each one runs at its own parameters, and the weight-sized work per
example is what the loop does too (its weight gradients). Per chunk:

1. at ``theta``: the factors of ``G_i = grad l_i(theta)`` (each layer's input, and the gradient at
   its output); this forward also resolves the labels;
2. at ``theta - lr G_i``: the factors of ``v_i = grad l_i(theta')``, and ``x`` and ``g`` at the
   attributed layers;
3. and 4. at ``theta +- h_i v_i``: ``g`` at the attributed layers only, the backward stopping there.

With ``hvp="exact"`` passes 3 and 4 are replaced by one backward through pass 1's backward:
``H(theta) v`` at a layer is ``d/dz <grad l(theta), v>`` for the zero ``z`` added there in pass 1
(the mixed second derivative, in either order), and ``<G_i, v_i>`` is, layer by layer, pass 1's
output gradient against the layer's output change under ``v_i`` (the rules' correction, from
factors). It reuses pass 1's forward and backward instead of running the model again, so it costs
about one of the finite difference's two passes.

Autograd is never asked for a parameter's gradient (the parameters are detached aliases during the
passes): a layer's output gradient comes from a tensor hook on its output, and the backward runs
to a zero added to the output of each first layer, so it crosses every layer above. Which models
this can run is decided beforehand by :mod:`captum_normgrad._order1.factored.tracing`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.func import functional_call

from captum_normgrad._core.capture import (
    LayerRecord,
    check_each_ran_once,
    float_activation,
    kept_value,
    register_tap,
)
from captum_normgrad._order1.autograd import ForwardCaller, second_derivative
from captum_normgrad._order1.factored.rules import rule_for
from captum_normgrad._order1.factored.rules.base import Factors, ModuleRule
from captum_normgrad._order1.settings import Order1Settings

__all__ = ["FactoredPasses", "FactoredUnsupported", "trainable_modules"]


class FactoredUnsupported(RuntimeError):
    """Something only seen while running the passes that the factored mode cannot follow (an
    in-place change of a recorded tensor, a layer run twice); the loop computes the same maps."""


@dataclass
class _Update:
    """Each example's parameters in a pass: ``theta + scale_i * D_i``, ``D`` as factors per layer."""

    factors: dict[str, Factors]
    scale: Tensor


@dataclass
class _Pass:
    """What the hooks do in the current forward pass."""

    update: _Update | None = None
    record_factors: bool = False
    tap_layers: bool = False
    # Keep the recorded inputs in the graph (pass 1 under hvp="exact": its double backward).
    keep_graph: bool = False
    forward_done: bool = False


def _check_grad_enabled(what: str) -> None:
    """Reentrant activation checkpointing runs a block without autograd; the loop names it."""
    if not torch.is_grad_enabled():
        raise FactoredUnsupported(
            f"{what} runs with gradients disabled (activation checkpointing or torch.no_grad() "
            "inside the model); use batch_mode='loop'"
        )


def _checked(saved: tuple[Tensor, int], what: str) -> Tensor:
    """A tensor saved during the forward pass, refused if an in-place operation changed it since."""
    tensor, version = saved
    if tensor._version != version:
        raise FactoredUnsupported(
            f"the {what} was modified in place after it was recorded, so batch_mode='factored' "
            "cannot use it; use batch_mode='loop' (same maps)"
        )
    return tensor


class FactoredPasses:
    """The passes for a chunk of examples at once.

    Args:
        caller: the :class:`ForwardCaller` around the user's model.
        modules: the layers with trainable parameters, by qualified name in the model.
        records: one per attributed layer.
        at_input: tap the attributed layers' inputs instead of their outputs.
        loss: ``loss(outputs, target) -> (B,)``.
    """

    def __init__(
        self,
        caller: ForwardCaller,
        modules: dict[str, nn.Module],
        records: Sequence[LayerRecord],
        at_input: bool,
        loss: Callable[[Tensor, object], Tensor],
    ) -> None:
        self.caller = caller
        self.rules: dict[str, ModuleRule] = {name: rule_for(m) for name, m in modules.items()}
        self.modules = modules
        # Every parameter (frozen ones too) is a detached alias during the passes: autograd then
        # builds no weight-gradient work, and the user's tensor hooks never fire.
        self.aliases = {f"model.{name}": p.detach() for name, p in caller.model.named_parameters()}
        self.records = list(records)
        self.at_input = at_input
        self.loss = loss
        self.state = _Pass()
        self.calls: dict[str, int] = {}
        self.module_inputs: dict[str, tuple[Tensor, int]] = {}
        self.module_outputs: dict[str, Tensor] = {}  # (shape and dtype, for a gradient of zero)
        self.module_grads: dict[str, Tensor] = {}
        self.root_zeros: dict[str, Tensor] = {}
        self.replaced: dict[str, Tensor] = {}  # inputs held from a pre-hook to its forward hook
        self.layer_values: list[tuple[Tensor, int] | None] = []
        self.layer_zeros: list[Tensor | None] = []

    # ------------------------------------------------------------------ hooks
    def _module_hook(self, name: str) -> Callable:
        rule = self.rules[name]

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            state = self.state
            if state.forward_done:
                return None
            _check_grad_enabled(f"module '{name}'")
            self.calls[name] = self.calls.get(name, 0) + 1
            update = state.update
            if name in self.replaced:
                new_input = self.replaced.pop(name)
                if update is None:
                    output = rule.twice_differentiable_output(new_input)
                else:
                    output = rule.output_at(new_input, update.factors[name], update.scale)
            else:
                new_input = args[0]
                if update is not None and name in update.factors:
                    correction = rule.correction(
                        new_input, output.shape, update.factors[name], update.scale
                    )
                    if correction is not None:
                        output = output + correction
            if state.record_factors:
                kept = new_input if state.keep_graph else new_input.detach()
                self.module_inputs[name] = (kept, kept._version)
                if new_input.requires_grad:
                    # d loss / d output, as the output was here: a tensor hook fires with the
                    # gradient of this value even if an in-place operation downstream
                    # (ReLU(inplace=True)) changes the tensor later, and costs no copy. The
                    # backward reaches this layer: its input depends on a tapped layer below.
                    output.register_hook(self._gradient_hook(name))
                else:
                    # A first layer (its input needs no gradient): a zero added to its output is
                    # what the backward pass runs to, so it crosses every layer above.
                    zero = torch.zeros_like(output, requires_grad=True)
                    self.root_zeros[name] = zero
                    output = output + zero
                self.module_outputs[name] = output
            return output

        return hook

    def _gradient_hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(gradient: Tensor) -> None:
            self.module_grads[name] = gradient

        return hook

    def _module_pre_hook(self, name: str) -> Callable:
        """Where the rule computes the whole output at the update, the module itself runs on an
        empty batch (no work) and its forward hook returns the rule's output."""
        rule = self.rules[name]

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            state = self.state
            if state.forward_done:
                return None
            update = state.update
            if update is None:
                if not (state.keep_graph and rule.rewrites_for_double_backward):
                    return None
            elif name not in update.factors or not rule.replaces(update.factors[name]):
                return None
            self.replaced[name] = args[0]
            return (args[0][:0], *args[1:])

        return hook

    def _layer_tap(self, index: int, value: Tensor) -> Tensor | None:
        state = self.state
        if state.forward_done:
            return None
        record = self.records[index]
        _check_grad_enabled(f"layer '{record.name}'")
        record.calls += 1
        float_activation(value, record.name, "input" if self.at_input else "output")
        if value.dim() == 0 or value.shape[0] != self.chunk:
            raise ValueError(
                f"layer '{record.name}' has an activation of shape {tuple(value.shape)} for a "
                f"chunk of {self.chunk} examples; order 1 needs batch-first activations"
            )
        if not state.tap_layers or record.calls > 1:
            return None
        kept = kept_value(value, self.at_input)
        self.layer_values[index] = (kept, kept._version)
        zero = torch.zeros_like(value, requires_grad=True)
        self.layer_zeros[index] = zero
        return value + zero

    @contextmanager
    def hooks(self) -> Iterator[FactoredPasses]:
        def taps() -> list:
            return [
                register_tap(record.layer, self.at_input, functools.partial(self._layer_tap, index))
                for index, record in enumerate(self.records)
            ]

        handles = []
        try:
            # The layers' own hooks first: an attributed layer with parameters is tapped after its
            # update is added (its output) or before the layer runs (its input).
            if self.at_input:  # before the modules' own pre-hooks, which may empty the input
                handles += taps()
            for name, module in self.modules.items():
                handles.append(module.register_forward_pre_hook(self._module_pre_hook(name)))
                handles.append(module.register_forward_hook(self._module_hook(name)))
            if not self.at_input:
                handles += taps()
            yield self
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------ passes
    def _forward(self, forward_args: tuple, state: _Pass) -> Tensor:
        self.state = state
        self.calls = {}
        self.module_inputs, self.module_outputs, self.module_grads = {}, {}, {}
        self.root_zeros = {}
        self.replaced = {}
        self.layer_values = [None] * len(self.records)
        self.layer_zeros = [None] * len(self.records)
        for record in self.records:
            record.calls = 0
        outputs = functional_call(self.caller, self.aliases, forward_args, strict=False)
        check_each_ran_once(self.records)
        for name, count in self.calls.items():
            if count != 1:
                raise FactoredUnsupported(
                    f"module '{name}' ran {count} times in one forward pass; batch_mode='factored' "
                    "needs each layer with parameters to run once. Use batch_mode='loop'"
                )
        state.forward_done = True
        return outputs

    def _factors(self, root_gradients: Sequence[Tensor | None]) -> dict[str, Factors]:
        """Each layer's input and output gradient from the last backward pass (a first layer's
        from its zero, ``root_gradients`` in order); a layer the loss does not depend on has a
        zero gradient."""
        gradients = dict(self.module_grads)
        gradients.update(zip(self.root_zeros, root_gradients))
        factors = {}
        for name, output in self.module_outputs.items():
            inputs = _checked(self.module_inputs[name], f"input of module '{name}'")
            gradient = gradients.get(name)
            if gradient is None:
                gradient = torch.zeros(output.shape, dtype=output.dtype, device=output.device)
            factors[name] = Factors(inputs, gradient)
        self.module_inputs, self.module_outputs, self.module_grads = {}, {}, {}
        self.root_zeros = {}
        return factors

    def _grad(
        self, loss: Tensor, wrt: Sequence[Tensor], create_graph: bool = False
    ) -> list[Tensor | None]:
        if not wrt or not loss.requires_grad:
            return [None] * len(wrt)
        return list(
            torch.autograd.grad(loss, list(wrt), allow_unused=True, create_graph=create_graph)
        )

    def _layer_gradients(self, found: Sequence[Tensor | None]) -> list[Tensor]:
        return [
            torch.zeros_like(zero) if gradient is None else gradient
            for zero, gradient in zip(self.layer_zeros, found)
        ]

    def terms(
        self,
        forward_args: tuple,
        resolve_target: Callable[[Tensor], object],
        settings: Order1Settings,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``x(theta')`` and ``g(theta') - lr H(theta) v`` at each layer for the chunk whose forward
        arguments are ``forward_args`` (batch first)."""
        try:
            return self._chunk_terms(forward_args, resolve_target, settings)
        except torch.utils.checkpoint.CheckpointError as error:
            # Non-reentrant checkpointing recomputes a block in the backward: the hooks' updates
            # are not replayed there, so the recomputation differs. The loop supports it.
            raise FactoredUnsupported(
                f"the model checkpoints activations ({error.args[0].splitlines()[0]}); use "
                "batch_mode='loop'"
            ) from error

    def _chunk_terms(
        self,
        forward_args: tuple,
        resolve_target: Callable[[Tensor], object],
        settings: Order1Settings,
    ) -> tuple[list[Tensor], list[Tensor]]:
        learning_rate, h_scale, exact_hvp = (
            settings.learning_rate,
            settings.h_scale,
            settings.exact_hvp,
        )
        self.chunk = forward_args[0].shape[0]

        # 1. theta: the factors of each example's gradient; the labels. For the exact product
        # they stay in the graph (the backward's too), with a zero at each attributed layer.
        outputs = self._forward(
            forward_args,
            _Pass(record_factors=True, tap_layers=exact_hvp, keep_graph=exact_hvp),
        )
        target = resolve_target(outputs.detach())
        loss = self.loss(outputs, target).sum()
        del outputs
        roots = list(self.root_zeros.values())
        zeros_at_theta = list(self.layer_zeros)
        # The backward runs to the tapped layers' zeros too: a layer tapped below every module with
        # parameters is where it starts.
        taps = [zero for zero in zeros_at_theta if zero is not None]
        found = self._grad(loss, [*roots, *taps], create_graph=exact_hvp)
        first = self._factors(found[: len(roots)])
        del loss, found

        # 2. theta' = theta - lr G: the direction v, and x and g at the layers.
        device = forward_args[0].device
        scale = torch.full((self.chunk,), -learning_rate, dtype=torch.float64, device=device)
        step = {name: f.detached() for name, f in first.items()} if exact_hvp else first
        outputs = self._forward(
            forward_args, _Pass(_Update(step, scale), record_factors=True, tap_layers=True)
        )
        loss = self.loss(outputs, target).sum()
        del outputs
        if not exact_hvp:  # (the exact product reads them again)
            self._release(first)
        found = self._grad(loss, [*self.layer_zeros, *self.root_zeros.values()])
        del loss
        direction = self._factors(found[len(self.layer_zeros) :])
        gradients = self._layer_gradients(found[: len(self.layer_zeros)])
        activations = [
            _checked(saved, f"activation of layer '{record.name}'")
            for saved, record in zip(self.layer_values, self.records)
        ]
        del step, found

        if exact_hvp:
            hessian_terms = self._exact_hessian_terms(first, direction, zeros_at_theta)
            corrected = [g - learning_rate * hv for g, hv in zip(gradients, hessian_terms)]
            return activations, corrected
        del first

        # 3. and 4. theta +- h v, h = h_scale / ||v|| per example (h_scale for a zero direction).
        squared = sum(
            (self.rules[name].squared_norm(f).double() for name, f in direction.items()),
            torch.zeros(self.chunk, dtype=torch.float64, device=device),
        )
        self._release(direction)
        norm = squared.sqrt()
        h = torch.where(norm > 0, h_scale / norm, torch.full_like(norm, h_scale))
        plus = self._shifted_gradients(forward_args, target, _Update(direction, h))
        minus = self._shifted_gradients(forward_args, target, _Update(direction, -h))
        corrected = []
        for g, p, m in zip(gradients, plus, minus):
            step = h.to(g.dtype).reshape(-1, *[1] * (g.dim() - 1))
            corrected.append(g - learning_rate * ((p - m) / (2 * step)))
        return activations, corrected

    def _release(self, factors: dict[str, Factors]) -> None:
        """Frees the inputs and gradients of the layers whose updates are formed and cached, in
        place (the pass's update shares the dict): the passes still to run then reuse that memory
        instead of the allocator taking fresh pages (see the README's page-fault figures)."""
        for name, found in factors.items():
            if self.rules[name].reads_only_derived(found):
                factors[name] = found.released()

    def _shifted_gradients(
        self, forward_args: tuple, target: object, update: _Update
    ) -> list[Tensor]:
        outputs = self._forward(forward_args, _Pass(update, tap_layers=True))
        loss = self.loss(outputs, target).sum()
        return self._layer_gradients(self._grad(loss, self.layer_zeros))

    def _exact_hessian_terms(
        self,
        first: dict[str, Factors],
        direction: dict[str, Factors],
        zeros_at_theta: Sequence[Tensor | None],
    ) -> list[Tensor]:
        """``H(theta) v`` at the layers exactly: ``d/dz <G, v>``, a backward through pass 1's
        backward. Per layer ``<G, v> = <g, c>``, ``c`` the output change ``v`` makes at pass 1's
        input ``p``: the backward starts from ``c`` at the output gradient ``g`` and from ``g`` at
        ``c`` (through ``p``, for the layers above ``z``), no product formed. Consumes ``direction``."""
        gradients, directions = [], []
        for name, factors in first.items():
            # (popped: the change's graph keeps what it needs of the direction; the rest is freed)
            change = self.rules[name].correction(
                factors.inputs, factors.grads.shape, direction.pop(name)
            )
            if change is None:
                continue
            change = change.expand(factors.grads.shape)
            gradients += [factors.grads, change]
            directions += [change, factors.grads]
        return second_derivative(gradients, directions, list(zeros_at_theta))


def trainable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules holding a trainable parameter of their own, by qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    }
