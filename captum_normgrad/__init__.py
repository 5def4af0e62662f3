"""NormGrad saliency for Captum users: order 0, order 1 and the adversarial map, as Captum
``LayerAttribution`` methods, with metrics and training-time tools.

The names below are imported on first use (PEP 562), so ``import captum_normgrad`` alone does not
import torch: the ``captum-normgrad`` command answers ``--help`` and usage errors at interpreter
speed. ``from captum_normgrad import LayerNormGrad`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; at run time, __getattr__ below
    from captum_normgrad.combine import (
        combine_layer_maps,
        normalize_per_example,
        upsample_maps,
    )
    from captum_normgrad.losses import per_example_loss
    from captum_normgrad.normgrad import LayerNormGrad, LayerNormGradSelective
    from captum_normgrad.normgrad_conv import LayerNormGradConv
    from captum_normgrad.order1 import LayerNormGradAdversarial, LayerNormGradOrder1
    from captum_normgrad.reshape import TokensToGrid, channels_last_to_first, tokens_to_grid

__all__ = [
    "LayerNormGrad",
    "LayerNormGradAdversarial",
    "LayerNormGradConv",
    "LayerNormGradOrder1",
    "LayerNormGradSelective",
    "TokensToGrid",
    "channels_last_to_first",
    "combine_layer_maps",
    "normalize_per_example",
    "per_example_loss",
    "tokens_to_grid",
    "upsample_maps",
]

__version__ = "0.1.0"

# Each public name -> the module that defines it.
_MODULE_OF = {
    "LayerNormGrad": "captum_normgrad.normgrad",
    "LayerNormGradAdversarial": "captum_normgrad.order1",
    "LayerNormGradConv": "captum_normgrad.normgrad_conv",
    "LayerNormGradOrder1": "captum_normgrad.order1",
    "LayerNormGradSelective": "captum_normgrad.normgrad",
    "TokensToGrid": "captum_normgrad.reshape",
    "channels_last_to_first": "captum_normgrad.reshape",
    "combine_layer_maps": "captum_normgrad.combine",
    "normalize_per_example": "captum_normgrad.combine",
    "per_example_loss": "captum_normgrad.losses",
    "tokens_to_grid": "captum_normgrad.reshape",
    "upsample_maps": "captum_normgrad.combine",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'captum_normgrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
