"""Fixtures the command-line tests share: a real photo as a PNG file and a small state dict."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch
import torchvision

from captum_normgrad import data

__all__ = ["cat_png", "squeezenet_weights"]


@pytest.fixture(scope="module")
def cat_png(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "cat.png"
    matplotlib.image.imsave(path, data.load_photo("chelsea").permute(1, 2, 0).numpy())
    return str(path)


@pytest.fixture(scope="module")
def squeezenet_weights(tmp_path_factory) -> str:
    """A 10-class SqueezeNet state dict: fits ``--num-classes 10``, not the 1000-class default."""
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(weights=None, num_classes=10)
    path = tmp_path_factory.mktemp("weights") / "squeezenet10.pt"
    torch.save(model.state_dict(), path)
    return str(path)
