"""The monitors' pause switch: passes inside :func:`monitor_paused` are not training steps.

:class:`~captum_normgrad.training.NormGradMonitor` reads :func:`is_paused` in its hooks; the code that
runs extra passes (order 1, the saliency losses) wraps them in :func:`monitor_paused`. A hook marked
:func:`ignored_while_paused` does nothing while paused, which lets order 1's factored mode run past it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

__all__ = ["ignored_while_paused", "is_ignored_while_paused", "is_paused", "monitor_paused"]

_Hook = TypeVar("_Hook", bound=Callable)

# Not thread-local on purpose: on CUDA, gradient hooks run on the autograd engine's device threads.
_pause_depth = 0

# Set on a hook's function; a bound method reads it from its function.
_IGNORED_WHILE_PAUSED = "_ignored_while_monitor_paused"


@contextmanager
def monitor_paused() -> Iterator[None]:
    """Forward and backward passes inside this block are ignored by every :class:`NormGradMonitor`.

    Wrap the gradient computations of a training step that are not the training loss's backward
    (e.g. ``torch.autograd.grad`` for a gradient penalty) so the maps stay those of the loss. A
    forward pass of the model inside the block is not a training step either: it is not counted,
    and a step recorded before the block stays open for the training loss's backward after it
    (order 1's inner passes, for one, run on stepped copies of the parameters).
    """
    global _pause_depth
    _pause_depth += 1
    try:
        yield
    finally:
        _pause_depth -= 1


def is_paused() -> bool:
    """Whether a :func:`monitor_paused` block is running."""
    return _pause_depth > 0


def ignored_while_paused(hook: _Hook) -> _Hook:
    """Mark a module hook that does nothing inside :func:`monitor_paused`."""
    setattr(hook, _IGNORED_WHILE_PAUSED, True)
    return hook


def is_ignored_while_paused(hook: Callable) -> bool:
    """Whether ``hook`` was marked by :func:`ignored_while_paused`."""
    return getattr(hook, _IGNORED_WHILE_PAUSED, False)
