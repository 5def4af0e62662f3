"""Tiny models shared by several test files."""

from __future__ import annotations

import torch
from torch import nn


def tiny_cnn(inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1])


def bn_cnn() -> nn.Sequential:
    """BatchNorm and in-place ReLUs, as in torchvision models."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 5, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
