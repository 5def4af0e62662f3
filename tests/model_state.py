"""Snapshot of everything an attribution call must leave untouched, and the check."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as module_globals

_MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
)


def _hook_keys(hooks: object) -> tuple | None:
    return None if hooks is None else tuple(hooks.keys())


def model_snapshot(model: nn.Module) -> dict:
    """Everything about a model an attribution call must not change: values, the tensor objects
    modules hold (bindings), flags, ``.grad`` and every hook dict (module, tensor and global)."""
    return {
        "parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "bindings": {
            (n, slot, name): id(tensor)
            for n, m in model.named_modules()
            for slot in ("_parameters", "_buffers")
            for name, tensor in getattr(m, slot).items()
        },
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            (n, slot): _hook_keys(getattr(m, slot, None))
            for n, m in model.named_modules()
            for slot in _MODULE_HOOK_DICTS
        },
        "tensor_hooks": {
            n: (_hook_keys(p._backward_hooks), _hook_keys(p._post_accumulate_grad_hooks))
            for n, p in model.named_parameters()
        },
        "global_hooks": {
            name: _hook_keys(getattr(module_globals, name)) for name in _GLOBAL_HOOK_DICTS
        },
        "grad_mode": (torch.is_grad_enabled(), torch.is_inference_mode_enabled()),
    }


def assert_model_unchanged(model: nn.Module, before: dict) -> None:
    after = model_snapshot(model)
    assert after["bindings"] == before["bindings"], "a parameter or buffer was rebound or added"
    for name, value in before["parameters"].items():
        assert torch.equal(after["parameters"][name], value), f"parameter {name} changed"
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), f"buffer {name} changed"
    for name, value in before["grads"].items():
        got = after["grads"][name]
        assert (got is None) == (value is None), f".grad of {name} changed"
        assert value is None or torch.equal(got, value), f".grad of {name} changed"
    for key in ("requires_grad", "training", "hooks", "tensor_hooks", "global_hooks", "grad_mode"):
        assert after[key] == before[key], f"{key} changed"
