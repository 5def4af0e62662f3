"""Leaving the user's model exactly as it was.

Attribution never writes ``.grad`` (gradients come from ``torch.autograd.grad``) and never changes
``training`` or ``requires_grad``. The one thing a forward pass itself changes is buffers: BatchNorm in
train mode updates its running statistics and ``num_batches_tracked``. Those are restored in place
after the call, also when it raises, so the model's tensors keep their identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["models_behind", "preserved_buffers"]


def models_behind(forward_func: object, layers: Iterable[nn.Module]) -> list[nn.Module]:
    """The modules whose buffers a call may touch: the forward function itself when it is a module
    (or a module's bound method), else at least the attributed layers."""
    owner = (
        forward_func
        if isinstance(forward_func, nn.Module)
        else getattr(forward_func, "__self__", None)
    )
    if isinstance(owner, nn.Module):
        return [owner]
    return list(layers)


@contextmanager
def preserved_buffers(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Restore every buffer of ``modules`` bitwise when the block ends, also when it raises."""
    saved = {}
    for module in modules:
        for buffer in module.buffers():
            if id(buffer) not in saved:
                saved[id(buffer)] = (buffer, buffer.detach().clone())
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, snapshot in saved.values():
                if not torch.equal(buffer, snapshot):
                    buffer.copy_(snapshot)
