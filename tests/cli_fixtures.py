"""Fixtures the command-line tests share: a real photo as a PNG file, a small state dict, and a
tiny Hugging Face ViT saved as a user's ``save_pretrained`` folder."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest
import torch
import torchvision

from captum_normgrad import data

__all__ = ["cat_png", "save_hugging_face_vit", "squeezenet_weights"]


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


def save_hugging_face_vit(folder: Path, labels: dict[int, str]) -> Path:
    """A two-block ViT for 32 px images (8 px patches) with random weights, saved in ``folder``."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, id2label=labels, label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder
