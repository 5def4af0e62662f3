"""Snapshot of everything an attribution call must leave untouched, and the check."""

from __future__ import annotations

import torch
from torch import nn


def model_snapshot(model: nn.Module) -> dict:
    """Everything about a model an attribution call must not change."""
    return {
        "parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(m._backward_pre_hooks),
            )
            for n, m in model.named_modules()
        },
        "tensor_hooks": {n: p._backward_hooks for n, p in model.named_parameters()},
    }


def assert_model_unchanged(model: nn.Module, before: dict) -> None:
    after = model_snapshot(model)
    for name, value in before["parameters"].items():
        assert torch.equal(after["parameters"][name], value), f"parameter {name} changed"
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), f"buffer {name} changed"
    for name, value in before["grads"].items():
        got = after["grads"][name]
        assert (got is None) == (value is None), f".grad of {name} changed"
        assert value is None or torch.equal(got, value), f".grad of {name} changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert all(not hooks for hooks in after["tensor_hooks"].values())
    from torch.nn.modules import module as module_globals

    assert not module_globals._global_forward_hooks
    assert not module_globals._global_forward_pre_hooks
    assert not module_globals._global_backward_hooks
