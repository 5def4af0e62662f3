"""The one front door: what every method checks before its first pass, in one place.

Order 0, selective, the convolution form, order 1, the adversarial map and the differentiable maps
of ``training/`` all take a batch, a target and a forward function. Each check below is written once
and called by every one of them, before any pass, so that the same bad input gets the same exception
and message from each, and argument errors come before anything the model itself would refuse (a
train-mode BatchNorm that cannot normalise one example, say):

- :func:`check_grad_mode`: autograd must be available (``torch.inference_mode()`` disables it for
  good; ``torch.no_grad()`` is fine, each method enables grad inside its call);
- :func:`checked_inputs`: a tensor or tuple of tensors, finite, with one batch dimension;
- :func:`check_target`: a target of a form any loss can take, of the batch's length;
- :func:`check_loss`: a loss spec every method knows;
- :func:`explained_output`: what the forward returned, as the tensor to explain (a Hugging Face
  ``ModelOutput`` from its ``.logits``), or one clear refusal;
- :func:`full_precision`: autocast off for order 1's passes, whose finite differences bfloat16 or
  float16 cannot resolve.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from numbers import Integral

import torch
from torch import Tensor

from captum_normgrad._core.captum import TargetType, format_inputs

__all__ = [
    "INFERENCE_MODE_REFUSAL",
    "check_grad_mode",
    "check_loss",
    "check_target",
    "check_target_form",
    "checked_inputs",
    "explained_output",
    "full_precision",
    "is_index",
    "target_length_error",
]

INFERENCE_MODE_REFUSAL = (
    "NormGrad needs autograd, which torch.inference_mode() disables; use torch.no_grad() or no "
    "context instead"
)


def check_grad_mode() -> None:
    """Refuse ``torch.inference_mode()``: its tensors can never enter a graph, so every gradient
    would be missing (a map of zeros, or an internal error deep in a pass)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(INFERENCE_MODE_REFUSAL)


def checked_inputs(inputs: object) -> tuple[Tensor, ...]:
    """``inputs`` as Captum's tuple of tensors, each finite and batch first (one batch size).

    Raises:
        ValueError: ``inputs`` is None or empty, holds NaN or infinite values, or its tensors do
            not share a first (batch) dimension.
        TypeError: ``inputs`` is not a tensor or a tuple of tensors.
    """
    inputs = format_inputs(inputs)
    for index, tensor in enumerate(inputs):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"input {index} contains NaN or infinite values")
    num_examples = inputs[0].shape[0] if inputs[0].dim() else None
    for index, tensor in enumerate(inputs):
        if tensor.dim() == 0 or tensor.shape[0] != num_examples:
            raise ValueError(
                f"input {index} has shape {tuple(tensor.shape)}; every input needs the batch of "
                f"{num_examples} examples as its first dimension"
            )
    return inputs


_TARGET_FORMS = (
    "None, an int, a tuple of ints (loss='output'), a list of them (one per example) or an "
    "integer tensor"
)


def is_index(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_index_tuple(value: object) -> bool:
    return isinstance(value, tuple) and all(is_index(v) for v in value)


def check_target_form(target: TargetType) -> None:
    """Refuse a ``target`` of a type no loss can take, naming the argument (before PyTorch's own
    messages, such as ``new(): invalid data type 'str'``, would).

    Raises:
        TypeError: ``target`` (or an entry of a list) is not an index, a tuple of them or a tensor.
        ValueError: a tensor ``target`` that does not hold integers.
    """
    if target is None or is_index(target) or _is_index_tuple(target):
        return
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(
                f"target must hold integer class indices, got a tensor of dtype {target.dtype}; "
                "convert it with target.long() if its values are indices"
            )
        return
    if isinstance(target, list):
        for entry in target:
            if not (is_index(entry) or _is_index_tuple(entry)):
                raise TypeError(
                    f"target must be {_TARGET_FORMS}; got a list holding {type(entry).__name__} "
                    f"({entry!r}). Map class names to indices first"
                )
        return
    raise TypeError(
        f"target must be {_TARGET_FORMS}; got {type(target).__name__} ({target!r}). "
        "Map class names to indices first"
    )


def target_length_error(entries: int, num_examples: int) -> ValueError:
    """The one message for a target whose length is not the batch's."""
    return ValueError(
        f"target has {entries} entries for a batch of {num_examples} examples; give one class "
        "index per example or a single index"
    )


def check_target(target: TargetType, num_examples: int, loss: object = "cross_entropy") -> None:
    """Refuse a target of the wrong type or length before any pass (its range needs the outputs,
    and is checked on them). A callable loss takes whatever target its author gave it.

    Raises:
        TypeError / ValueError: as :func:`check_target_form`, or a list or tensor target with
            neither one entry nor one per example.
    """
    if callable(loss):
        return
    check_target_form(target)
    if isinstance(target, list):
        entries = len(target)
    elif isinstance(target, Tensor) and target.dim() > 0 and target.numel() > 1:
        entries = target.shape[0]
    else:
        return
    if entries not in (1, num_examples):
        raise target_length_error(entries, num_examples)


def check_loss(loss: object) -> None:
    """Refuse a loss spec no method knows (order 1 then refuses ``"output"`` itself)."""
    if loss in ("cross_entropy", "output") or callable(loss):
        return
    raise ValueError(
        f"loss must be 'cross_entropy', 'output' or a callable(outputs, target), got {loss!r}"
    )


def explained_output(outputs: object) -> Tensor:
    """What the forward function returned, as the tensor the loss is built from.

    A tensor is itself. An output that carries a ``.logits`` tensor (a Hugging Face
    ``ModelOutput``, any object of that shape) is explained from its logits, and a dict with an
    ``"out"`` tensor (torchvision's segmenters: ``{"out": ..., "aux": ...}``) from ``"out"``, the
    prediction (the auxiliary head only adds to the training loss), at every order. Anything else
    (a tuple, another dict, a list) is refused: which of its entries to explain is the user's
    choice, made by wrapping the model.

    Raises:
        ValueError: naming the type the forward returned.
    """
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(outputs, Mapping) and isinstance(outputs.get("out"), Tensor):
        return outputs["out"]
    kind = type(outputs).__name__
    keys = f" with keys {list(outputs)}" if isinstance(outputs, Mapping) else ""
    raise ValueError(
        f"the forward function returned a {kind}{keys}, not a tensor; wrap the model so it "
        "returns the tensor to explain (an output with a .logits tensor, such as a Hugging Face "
        "ModelOutput, is explained from its logits; a dict from its 'out' entry)"
    )


@contextmanager
def full_precision(*devices: torch.device) -> Iterator[None]:
    """Autocast off on ``devices`` for the block: the passes run in the parameters' and inputs'
    own dtype. Order 1's map is a difference of gradients ``eps / (2h)`` apart, far below
    bfloat16's resolution; under autocast it would be rounding noise (or, on CPU, fail inside
    oneDNN on mixed dtypes)."""
    with ExitStack() as stack:
        for device_type in sorted({device.type for device in devices}):
            try:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            except RuntimeError:  # a device without autocast: nothing to turn off
                pass
        yield
