"""Shared fixtures: fixed seeds, one intra-op thread for tiny models, and the device parameter
(CUDA skipped where absent)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def fixed_seeds() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add synchronisation (several times slower when the two
    cores are shared). Restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return request.param


# The command-line tests' fixtures: a photo as a PNG file, a small state dict.
from cli_fixtures import cat_png, squeezenet_weights  # noqa: E402, F401
