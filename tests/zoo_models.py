"""The model zoo of the property test: torchvision architectures (random weights, small inputs) and
small custom models, each with the layers to attribute and the input it takes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

NUM_CLASSES = 4


@dataclass(frozen=True)
class ZooModel:
    """A model of the zoo.

    Attributes:
        build: a fresh model (eval mode).
        layers: qualified names of modules to attribute (each runs once per forward pass).
        input_shape: one example's shape, ``(C, *S)``.
        refused: qualified names of layers order 0 must refuse with a message matching
            ``refusal`` (a layer run under reentrant checkpointing gets no gradient).
        refusal: the regex that message matches.
    """

    build: Callable[[], nn.Module]
    layers: tuple[str, ...]
    input_shape: tuple[int, ...]
    refused: tuple[str, ...] = ()
    refusal: str = ""


def module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


@cache
def _torchvision(name: str) -> nn.Module:
    """Built once per session (VGG's classifier alone takes a second); each example gets a copy."""
    torch.manual_seed(0)
    if name == "googlenet":
        return torchvision.models.googlenet(
            weights=None, num_classes=NUM_CLASSES, aux_logits=True, init_weights=True
        ).eval()
    model = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES).eval()
    if name == "vgg11_bn":
        # The 25088x4096 classifier (100M weights, 7x7 copies of a 1x1 map at 32 px) would make
        # every snapshot and order-1 pass cost seconds; the features stay torchvision's, the head
        # keeps its layout (ReLU(inplace), Dropout) at a small width.
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(
            nn.Linear(512, 64), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(64, NUM_CLASSES)
        )
    return model


def _copy_of(name: str) -> Callable[[], nn.Module]:
    return lambda: copy.deepcopy(_torchvision(name))


class ReassignsBuffers(nn.Module):
    """A forward that rebinds its buffers to new tensors (a running mean, a step counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, NUM_CLASSES)
        self.register_buffer("ema", torch.zeros(4))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        features = torch.relu(self.bn(self.conv(x)))
        self.ema = 0.9 * self.ema + 0.1 * features.detach().mean(dim=(0, 2, 3))
        self.steps = self.steps + 1
        return self.head(features.mean(dim=(2, 3)))


class TiedWeights(nn.Module):
    """An autoencoder-style pair of convolutions sharing one weight, and an unused spare head."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.decode = nn.Conv2d(6, 3, 1)
        self.mix = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.share = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.share.weight = self.encode.weight  # tied
        self.head = nn.Linear(6, NUM_CLASSES)
        self.spare_head = nn.Linear(6, NUM_CLASSES)  # a trainable parameter never used

    def forward(self, x):
        hidden = torch.relu(self.encode(x))
        mixed = self.mix(self.decode(hidden))
        return self.head(torch.relu(self.share(mixed)).mean(dim=(2, 3)))


class Checkpointed(nn.Module):
    """A block under activation checkpointing (reentrant or not) between two plain layers."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3))
        self.head = nn.Sequential(nn.Conv2d(5, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(5, NUM_CLASSES)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        if self.reentrant is None:
            x = self.block(x)
        else:
            x = checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.fc(self.head(x))


def _conv_net(dims: int) -> nn.Module:
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    norm = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 3: nn.AdaptiveAvgPool3d}[dims]
    return nn.Sequential(
        conv(2, 4, 3, padding=1),
        norm(4),
        nn.ReLU(inplace=True),
        conv(4, 5, 3, stride=2, dilation=1, groups=1),
        nn.ReLU(),
        pool(1),
        nn.Flatten(),
        nn.Linear(5, NUM_CLASSES),
    ).eval()


def _bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, NUM_CLASSES),
    ).eval()


CUSTOM = {
    "bn_cnn": ZooModel(_bn_cnn, ("0", "1", "3", "7"), (3, 8, 8)),
    "reassigns_buffers": ZooModel(ReassignsBuffers, ("conv", "bn"), (3, 6, 6)),
    "tied_weights": ZooModel(TiedWeights, ("encode", "decode", "mix", "share"), (3, 6, 6)),
    "checkpoint_reentrant": ZooModel(
        lambda: Checkpointed(reentrant=True).eval(),
        ("stem", "block.0", "block.2", "head.0"),
        (3, 7, 7),
        refused=("stem", "block.0", "block.2"),
        refusal="use_reentrant=False",
    ),
    "checkpoint_non_reentrant": ZooModel(
        lambda: Checkpointed(reentrant=False).eval(),
        ("stem", "block.0", "block.2", "head.0"),
        (3, 7, 7),
    ),
    "conv1d": ZooModel(lambda: _conv_net(1), ("0", "1", "3"), (2, 9)),
    "conv3d": ZooModel(lambda: _conv_net(3), ("0", "1", "3"), (2, 5, 5, 5)),
}

TORCHVISION = {
    "resnet18": ZooModel(
        _copy_of("resnet18"), ("layer1.0.conv1", "layer2", "layer3.1.conv2"), (3, 32, 32)
    ),
    "vgg11_bn": ZooModel(_copy_of("vgg11_bn"), ("features.4", "features.8"), (3, 32, 32)),
    "mobilenet_v3_small": ZooModel(
        _copy_of("mobilenet_v3_small"), ("features.2", "features.4.block.0.0"), (3, 32, 32)
    ),
    "googlenet": ZooModel(
        _copy_of("googlenet"), ("inception3a", "inception4a.branch2.1.conv"), (3, 32, 32)
    ),
    "efficientnet_b0": ZooModel(
        _copy_of("efficientnet_b0"), ("features.2", "features.3.0.block.1.0"), (3, 32, 32)
    ),
}
