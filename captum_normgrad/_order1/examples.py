"""Per-example slices of order 1's forward arguments and targets.

Every example gets its own inner step, so the passes run on one example or a chunk of them at a time:
Captum's per-example arguments (tensors whose first dimension is the batch) and per-example targets
are sliced, the others passed whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from captum_normgrad._core.captum import TargetType

__all__ = [
    "is_per_example",
    "one_example_at_a_time",
    "slice_examples",
    "target_of_examples",
]


def is_per_example(value: object, num_examples: int) -> bool:
    """Captum's convention for additional arguments: a tensor whose first dimension is the batch."""
    return isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == num_examples


def target_of_examples(target: TargetType, start: int, stop: int, num_examples: int) -> TargetType:
    """The part of Captum's ``target`` for examples ``start:stop``: per-example forms are sliced,
    a target shared by the batch is kept."""
    if is_per_example(target, num_examples):
        return target[start:stop]
    if isinstance(target, list) and len(target) == num_examples and num_examples > 1:
        return target[start:stop]
    return target


def slice_examples(
    inputs: tuple[Tensor, ...], args: tuple, per_example: Sequence[bool], start: int, stop: int
) -> tuple:
    """The forward arguments of examples ``start:stop``: inputs and per-example additional
    arguments sliced, the others passed whole."""
    return (
        *(x[start:stop] for x in inputs),
        *(a[start:stop] if each else a for a, each in zip(args, per_example)),
    )


@contextmanager
def one_example_at_a_time(model: nn.Module) -> Iterator[None]:
    """Name train-mode BatchNorm when it cannot normalise one example (one value per channel)."""
    try:
        yield
    except ValueError as error:
        if "Expected more than 1 value per channel when training" not in str(error):
            raise
        names = [
            name or type(module).__name__
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
        ]
        raise ValueError(
            f"order 1 runs its passes on one example at a time (each example gets its own inner "
            f"step), and BatchNorm in training mode ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}) cannot normalise a single value per channel "
            "(a 1x1 activation of one example). Call model.eval() so BatchNorm uses its running "
            "statistics, or give larger inputs"
        ) from error
