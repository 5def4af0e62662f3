"""The one module that touches Captum's private helpers.

Captum's private API can change between releases; keeping every such import here means a Captum
upgrade is checked in one place. The supported range is pinned in ``pyproject.toml``.

``log_usage`` is Captum's decoration of every ``attribute`` method. Captum's wrappers
(``NoiseTunnel``, ``GradientShap``) call ``attribute.__wrapped__`` to skip the logging, so a method
without it cannot be wrapped: every public ``attribute`` here carries it too.
"""

from __future__ import annotations

from captum._utils.common import (
    _format_additional_forward_args,
    _format_tensor_into_tuples,
    _run_forward,
    _select_targets,
)
from captum._utils.typing import TargetType
from captum.log import log_usage
from torch import Tensor

__all__ = [
    "TargetType",
    "format_additional_forward_args",
    "format_inputs",
    "log_usage",
    "run_forward",
    "select_targets",
]

format_additional_forward_args = _format_additional_forward_args
run_forward = _run_forward
select_targets = _select_targets


def format_inputs(inputs: object) -> tuple[Tensor, ...]:
    """``inputs`` as a tuple of tensors, Captum's convention, or an error naming what is wrong.

    Captum itself only asserts, or fails later with ``'NoneType' object is not iterable``; a user
    who passes a list or a NumPy array needs to hear that a tensor is expected.

    Raises:
        ValueError: ``inputs`` is None or an empty tuple.
        TypeError: ``inputs`` (or one of its entries) is not a tensor.
    """
    if inputs is None:
        raise ValueError("inputs is None; pass the batch as a tensor (or a tuple of tensors)")
    if isinstance(inputs, Tensor):
        return _format_tensor_into_tuples(inputs)
    if not isinstance(inputs, tuple):
        raise TypeError(
            f"inputs must be a tensor or a tuple of tensors, got a {type(inputs).__name__}; "
            "convert it first, e.g. torch.as_tensor(inputs) or torch.stack(list_of_tensors)"
        )
    if not inputs:
        raise ValueError("inputs is an empty tuple; pass at least one tensor")
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"inputs[{index}] is a {type(tensor).__name__}, not a tensor; convert it with "
                "torch.as_tensor(...)"
            )
    return inputs
