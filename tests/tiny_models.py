"""A tiny float64 CNN and batch shared by the training-regulariser tests."""

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
