"""Capturing a layer's activation during one forward pass, with hooks that live only inside a call.

The forward hook hands the rest of the network a *clone* of the activation it records, so an in-place
operation downstream (torchvision's ``ReLU(inplace=True)``, ResNet's ``out += identity``) cannot
overwrite what was saved, and the saved tensor stays the one autograd differentiates against. At a
layer's input (``at_input``) the record keeps a copy of the input, and the layer gets the input plus
a zero leaf: the gradient is the one that flows into the input through this layer, however else the
model uses that tensor and whatever it does to it in place afterwards.

Only the forward pass is recorded. Activation checkpointing re-runs a block during the backward pass
and so fires the hooks again; once the caller marks the forward pass as over
(:meth:`Capture.end_forward`), those calls pass through untouched, so records and counts stay those of
the forward pass. A layer that ran with grad disabled (reentrant checkpointing, ``torch.no_grad()``
inside the model) gets no gradient at all: :func:`layer_gradients` refuses it by name rather than
returning the all-zero map it would otherwise give, and so does a layer whose activation never
reaches the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from captum_normgrad._core.hidden_states import activation_in, with_activation

__all__ = [
    "Capture",
    "LayerRecord",
    "capture_layers",
    "check_each_ran_once",
    "float_activation",
    "kept_value",
    "layer_gradients",
    "layer_name",
    "register_tap",
    "unreached_refusal",
]


@dataclass
class LayerRecord:
    """What one call saw at one layer.

    Attributes:
        layer: the module.
        name: its qualified name in the model (or its class name), for error messages.
        calls: how many times the module ran in the forward pass.
        activation: the value NormGrad takes (the layer's output, or with
            ``attribute_to_layer_input=True`` a copy of its input, which the model may change in
            place after the layer ran); part of the autograd graph where anything upstream is.
        tap: the tensor the gradient is taken with respect to. At an output, the activation itself
            (everything downstream uses it). At an input, a zero added on the layer's input edge:
            the gradient that reaches the input through this layer, the virtual identity's
            gradient, also where the model uses the same tensor elsewhere (``x + f(x)``) and
            whether or not anything upstream requires grad.
        layer_input: the layer's first input, kept only when asked for (the real-convolution form).
        gradient: ``d loss / d activation``, filled in after the backward pass.
        evidence_sign: ``+1`` when the backpropagated quantity is a score to increase
            (``loss="output"``), ``-1`` when it is a loss to decrease, so that
            ``evidence_sign * gradient`` always points toward more evidence for the target.
        grad_enabled: whether autograd was recording when the layer ran; without it no gradient
            can reach the activation.
        at_input: whether ``activation`` is the layer's input (its layout may differ from the
            output's, e.g. across a ``Permute``).
    """

    layer: nn.Module
    name: str
    calls: int = 0
    activation: Tensor | None = None
    tap: Tensor | None = None
    layer_input: Tensor | None = None
    gradient: Tensor | None = None
    evidence_sign: int = 1
    grad_enabled: bool = True
    at_input: bool = False


class Capture(list):
    """The records of one capture (a list, in layer order) and whether its forward pass is over."""

    forward_over: bool = False

    def end_forward(self) -> None:
        """Stop recording: later calls of the layers (checkpoint recomputation) pass through."""
        self.forward_over = True


def layer_name(model: object, layer: nn.Module) -> str:
    """The layer's qualified name inside ``model`` when it can be found, else its class name."""
    if isinstance(model, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name or type(layer).__name__
    return type(layer).__name__


def float_activation(tensor: object, name: str, where: str = "output") -> Tensor:
    """The one refusal, for every method and the monitor, of a layer whose activation is not a
    floating-point tensor (a tuple no architecture rule says how to read, an integer tensor)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(
            f"layer '{name}' has a {type(tensor).__name__} as its {where}; NormGrad needs a single "
            "tensor there: attribute a module inside it that returns one (its last norm or MLP)"
        )
    if not tensor.is_floating_point():
        raise TypeError(
            f"layer '{name}' has a {tensor.dtype} tensor as its {where}; NormGrad needs a "
            "floating-point activation"
        )
    return tensor


def _grad_tracking(tensor: object, name: str, where: str) -> Tensor:
    tensor = float_activation(tensor, name, where)
    # Nothing upstream requires grad (frozen model, plain input): start a graph here.
    return tensor if tensor.requires_grad else tensor.detach().requires_grad_()


@contextmanager
def capture_layers(
    model: object,
    layers: Sequence[nn.Module],
    *,
    at_input: bool,
    keep_layer_input: bool = False,
) -> Iterator[Capture]:
    """Record the activation of each layer during the forward passes run inside the block.

    Args:
        model: the forward function, used only to name layers in error messages.
        layers: the modules to record.
        at_input: record each layer's input instead of its output.
        keep_layer_input: also keep each layer's first input (used by the convolution form).

    Yields:
        A :class:`Capture`: one :class:`LayerRecord` per layer, in order, filled in as the forward
        pass runs until :meth:`Capture.end_forward` is called.

    Every hook is removed when the block ends, also when it raises.
    """
    records = Capture(
        LayerRecord(layer, layer_name(model, layer), at_input=at_input) for layer in layers
    )
    handles = []

    def pre_hook(record: LayerRecord):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if records.forward_over:
                return None
            record.calls += 1
            record.grad_enabled = torch.is_grad_enabled()
            if not args:
                raise TypeError(f"layer '{record.name}' was called without a positional input")
            if at_input:
                source = float_activation(args[0], record.name, "input")
                record.activation = source.clone()
                record.tap = torch.zeros_like(source, requires_grad=True)
                # A new tensor: the layer may change its input in place (ReLU(inplace=True)).
                return (source + record.tap, *args[1:])
            if keep_layer_input:
                # The layer sees a private copy, so nothing downstream can change what we keep.
                record.layer_input = args[0].clone()
                return (record.layer_input, *args[1:])
            return None

        return hook

    def forward_hook(record: LayerRecord):
        def hook(module: nn.Module, args: tuple, output: object) -> object:
            if records.forward_over:
                return None
            activation = activation_in(module, output)
            record.activation = record.tap = _grad_tracking(activation, record.name, "output")
            return with_activation(module, output, record.activation.clone())

        return hook

    try:
        for record in records:
            handles.append(record.layer.register_forward_pre_hook(pre_hook(record)))
            if not at_input:
                handles.append(record.layer.register_forward_hook(forward_hook(record)))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def check_each_ran_once(records: Sequence[LayerRecord]) -> None:
    """Refuse layers that never ran or ran more than once: either would give a silently wrong map."""
    for record in records:
        if record.calls == 0:
            raise RuntimeError(
                f"layer '{record.name}' did not run during the forward pass; pass a module that "
                "the model actually calls"
            )
        if record.calls > 1:
            raise RuntimeError(
                f"layer '{record.name}' ran {record.calls} times in one forward pass (a module "
                "reused, like torchvision ResNet's shared `relu`); its activation is ambiguous. "
                "Choose a module that runs once, e.g. the block's `bn`/`conv` or the block itself"
            )


def unreached_refusal(name: str, at_input: bool) -> RuntimeError:
    """The one message for a layer that ran but whose activation the loss does not depend on."""
    where = "input (through the layer)" if at_input else "output"
    return RuntimeError(
        f"layer '{name}' ran, but its {where} does not reach the loss: nothing it feeds reaches "
        "the model's outputs, so its map would be all zeros. Attribute a layer on the path from "
        "the inputs to the outputs"
    )


def layer_gradients(
    total_loss: Tensor,
    records: Sequence[LayerRecord],
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> None:
    """``d total_loss / d tap`` into each record's ``gradient``, or a refusal naming the layer.

    ``torch.autograd.grad(..., allow_unused=True)`` gives ``None`` both for a layer that ran with
    grad disabled (reentrant checkpointing, ``torch.no_grad()`` inside the model) and for one whose
    activation the loss does not depend on. Either map would be zeros for no reason: both are
    errors, each with what to do.
    """
    try:
        gradients = torch.autograd.grad(
            total_loss,
            [record.tap for record in records],
            create_graph=create_graph,
            retain_graph=retain_graph,
            allow_unused=True,
        )
    except RuntimeError as error:
        if "use_reentrant" not in str(error):
            raise
        names = ", ".join(f"'{record.name}'" for record in records)
        raise RuntimeError(
            f"the gradient to layer {names} passes through reentrant activation checkpointing "
            "(torch.utils.checkpoint.checkpoint(..., use_reentrant=True)), which cannot give the "
            "gradient of an intermediate activation. Use use_reentrant=False in the model"
        ) from error
    for record, gradient in zip(records, gradients):
        if gradient is None and not record.grad_enabled:
            raise RuntimeError(
                f"layer '{record.name}' ran with gradient recording disabled (reentrant activation "
                "checkpointing, torch.utils.checkpoint(..., use_reentrant=True), or torch.no_grad() "
                "inside the model), so no gradient reaches its activation and its map would be all "
                "zeros. Use torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or "
                "attribute a layer outside the no-grad region"
            )
        if gradient is None:
            raise unreached_refusal(record.name, record.at_input)
        record.gradient = gradient


def register_tap(
    layer: nn.Module, at_input: bool, tap: Callable[[object], Tensor | None]
) -> RemovableHandle:
    """A hook that hands ``tap`` the layer's output (or first input) and passes on what it returns
    instead (None: unchanged); the caller removes the handle when its call ends."""
    if at_input:

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            tapped = tap(args[0] if args else None)
            return None if tapped is None else (tapped, *args[1:])

        return layer.register_forward_pre_hook(pre_hook)

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        return with_activation(module, output, tap(activation_in(module, output)))

    return layer.register_forward_hook(hook)


def kept_value(value: Tensor, at_input: bool) -> Tensor:
    """A tapped activation as order 1's passes keep it, out of the graph. An input is copied: the
    model still holds that tensor and may change it in place after the layer ran."""
    return value.detach().clone() if at_input else value.detach()
