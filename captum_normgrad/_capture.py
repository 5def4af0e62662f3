"""Capturing a layer's activation during one forward pass, with hooks that live only inside a call.

The forward hook hands the rest of the network a *clone* of the activation it records, so an in-place
operation downstream (torchvision's ``ReLU(inplace=True)``, ResNet's ``out += identity``) cannot
overwrite what was saved, and the saved tensor stays the one autograd differentiates against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["LayerRecord", "capture_layers", "check_each_ran_once", "layer_name"]


@dataclass
class LayerRecord:
    """What one call saw at one layer.

    Attributes:
        layer: the module.
        name: its qualified name in the model (or its class name), for error messages.
        calls: how many times the module ran in the forward pass.
        activation: the tensor whose gradient NormGrad takes (the layer's output, or its input with
            ``attribute_to_layer_input=True``); always part of the autograd graph.
        layer_input: the layer's first input, kept only when asked for (the real-convolution form).
        gradient: ``d loss / d activation``, filled in after the backward pass.
        evidence_sign: ``+1`` when the backpropagated quantity is a score to increase
            (``loss="output"``), ``-1`` when it is a loss to decrease, so that
            ``evidence_sign * gradient`` always points toward more evidence for the target.
    """

    layer: nn.Module
    name: str
    calls: int = 0
    activation: Tensor | None = None
    layer_input: Tensor | None = None
    gradient: Tensor | None = None
    evidence_sign: int = 1


def layer_name(model: object, layer: nn.Module) -> str:
    """The layer's qualified name inside ``model`` when it can be found, else its class name."""
    if isinstance(model, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name or type(layer).__name__
    return type(layer).__name__


def _grad_tracking(tensor: object, name: str, where: str) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(
            f"layer '{name}' has a {type(tensor).__name__} as its {where}; NormGrad needs a single "
            "tensor there"
        )
    if not tensor.is_floating_point():
        raise TypeError(
            f"layer '{name}' has a {tensor.dtype} tensor as its {where}; NormGrad needs a "
            "floating-point activation"
        )
    # Nothing upstream requires grad (frozen model, plain input): start a graph here.
    return tensor if tensor.requires_grad else tensor.detach().requires_grad_()


@contextmanager
def capture_layers(
    model: object,
    layers: Sequence[nn.Module],
    *,
    at_input: bool,
    keep_layer_input: bool = False,
) -> Iterator[list[LayerRecord]]:
    """Record the activation of each layer during the forward passes run inside the block.

    Args:
        model: the forward function, used only to name layers in error messages.
        layers: the modules to record.
        at_input: record each layer's input instead of its output.
        keep_layer_input: also keep each layer's first input (used by the convolution form).

    Yields:
        One :class:`LayerRecord` per layer, in order, filled in as the forward pass runs.

    Every hook is removed when the block ends, also when it raises.
    """
    records = [LayerRecord(layer, layer_name(model, layer)) for layer in layers]
    handles = []

    def pre_hook(record: LayerRecord):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            record.calls += 1
            if not args:
                raise TypeError(f"layer '{record.name}' was called without a positional input")
            if at_input:
                record.activation = _grad_tracking(args[0], record.name, "input")
                return (record.activation.clone(), *args[1:])
            if keep_layer_input:
                # The layer sees a private copy, so nothing downstream can change what we keep.
                record.layer_input = args[0].clone()
                return (record.layer_input, *args[1:])
            return None

        return hook

    def forward_hook(record: LayerRecord):
        def hook(module: nn.Module, args: tuple, output: object) -> Tensor:
            record.activation = _grad_tracking(output, record.name, "output")
            return record.activation.clone()

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
