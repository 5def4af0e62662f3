"""Leaving the user's model exactly as it was.

Attribution never writes ``.grad`` (gradients come from ``torch.autograd.grad``) and never changes
``training`` or ``requires_grad``. What a forward pass itself may change is module state: BatchNorm
in train mode updates its running statistics in place, and a forward that does
``self.ema = 0.9 * self.ema + ...`` or ``self.steps = self.steps + 1`` *rebinds* the buffer to a new
tensor. Copying the saved values back into the old tensor would leave the module pointing at the new
one, so both are restored after the call, also when it raises: every module gets back the very tensor
objects it had (buffers and parameters, none added, none lost), and those hold their old values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

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


def _all_modules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for module in modules:
        for submodule in module.modules():
            seen.setdefault(id(submodule), submodule)
    return list(seen.values())


def _restore_bindings(module: nn.Module, slot: str, saved: dict[str, Tensor | None]) -> None:
    """Make ``module._buffers`` / ``module._parameters`` hold exactly the saved objects again."""
    current = getattr(module, slot)
    for name in [name for name in current if name not in saved]:
        del current[name]  # added by the call
    for name, tensor in saved.items():
        if name not in current or current[name] is not tensor:
            current[name] = tensor


# Module attributes restored by their own mechanism (or deliberately left alone: the hook dicts are
# the user's, and a hook registered during a call is removed by whoever registered it).
_MANAGED = frozenset({"_buffers", "_parameters", "_modules", "_non_persistent_buffers_set"})


def _restore_attributes(module: nn.Module, saved: dict[str, object]) -> None:
    """Make the module's plain attributes (``self.calls``, ``self.last = tensor``) the saved
    objects again, none added, none lost."""
    current = vars(module)
    for name in [name for name in current if name not in saved and name not in _MANAGED]:
        del current[name]
    for name, value in saved.items():
        if current.get(name, _MISSING) is not value:
            current[name] = value


_MISSING = object()


@contextmanager
def preserved_buffers(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Restore the state of ``modules`` (and their submodules) when the block ends, also when it
    raises: buffer and parameter bindings by identity, buffer values bitwise, in place, and every
    plain attribute a forward may rebind (a counter, a cached tensor; also what ``torch.fx`` leaves
    behind when it traces a forward that assigns, a ``Proxy``)."""
    modules = _all_modules(modules)
    bindings = [
        (
            module,
            dict(module._buffers),
            dict(module._parameters),
            set(module._non_persistent_buffers_set),
            {k: v for k, v in vars(module).items() if k not in _MANAGED},
        )
        for module in modules
    ]
    values: dict[int, tuple[Tensor, Tensor]] = {}
    for _, buffers, _, _, _ in bindings:
        for buffer in buffers.values():
            if buffer is not None and id(buffer) not in values:
                values[id(buffer)] = (buffer, buffer.detach().clone())
    try:
        yield
    finally:
        for module, buffers, parameters, non_persistent, attributes in bindings:
            _restore_attributes(module, attributes)
            _restore_bindings(module, "_buffers", buffers)
            _restore_bindings(module, "_parameters", parameters)
            module._non_persistent_buffers_set.clear()
            module._non_persistent_buffers_set.update(non_persistent)
        with torch.no_grad():
            for buffer, snapshot in values.values():
                if not torch.equal(buffer, snapshot):
                    buffer.copy_(snapshot)
