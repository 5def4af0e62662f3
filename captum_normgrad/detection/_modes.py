"""The modes a detector runs in for NormGrad, each set for one pass and restored exactly.

- :func:`loss_mode`: torchvision's detectors compute their training loss only in training mode
  (``model.train()`` and ``model(images, targets)``). NormGrad explains that loss for *this*
  network, so every normalisation layer with running statistics (BatchNorm, which random-weight
  torchvision detectors use instead of ``FrozenBatchNorm2d``, SyncBatchNorm, tracked
  InstanceNorm) stays in evaluation mode: in training mode it would normalise with the image's own
  statistics and update its running ones. Dropout stays off, so every pass sees the same network.
- :func:`eval_mode`: every module in evaluation mode, for the detections and their scores.
- :func:`fixed_sampling`: the loss samples anchors and proposals at random
  (``BalancedPositiveNegativeSampler`` draws ``torch.randperm``); with the random generators forked
  and seeded, every pass (order 1's four of them included) sees the same sample, and the caller's
  generators are left where they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["eval_mode", "fixed_sampling", "loss_mode", "restored_modes"]

_DROPOUT = (nn.modules.dropout._DropoutNd,)


@contextmanager
def restored_modes(model: nn.Module) -> Iterator[None]:
    """Every module's ``training`` flag back as it was when the block ends, also when it raises."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _frozen(module: nn.Module) -> bool:
    """A module whose training mode would change the network a pass sees."""
    if isinstance(module, _NormBase):
        return module.track_running_stats
    return isinstance(module, _DROPOUT)


@contextmanager
def loss_mode(model: nn.Module) -> Iterator[None]:
    """Training mode (the loss is computed), with normalisation statistics and dropout frozen."""
    with restored_modes(model):
        model.train()
        for module in model.modules():
            if _frozen(module):
                module.eval()
        yield


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    with restored_modes(model):
        model.eval()
        yield


@contextmanager
def fixed_sampling(model: nn.Module, seed: int) -> Iterator[None]:
    """The CPU generator and those of the model's CUDA devices forked and seeded with ``seed``."""
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
