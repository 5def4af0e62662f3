"""The names of the offline assets, without importing torch (the command line's choices and help).

:mod:`captum_normgrad.data` re-exports them beside the loaders that use them.
"""

from __future__ import annotations

__all__ = ["BUNDLED_MODEL", "EFFICIENTNET_LITE0_LAYERS", "SAMPLE_PHOTOS"]

BUNDLED_MODEL = "efficientnet_lite0"
"""The command line's name for :func:`captum_normgrad.data.load_efficientnet_lite0`."""

SAMPLE_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "camera", "rocket", "china", "grace_hopper")
"""The names :func:`captum_normgrad.data.load_photo` and ``load_sample`` accept."""

# Four depths of EfficientNet-Lite0 for a 224 x 224 input: 56x56, 28x28, 14x14 and 7x7 maps. The
# last is the head's pre-activation, the usual Grad-CAM layer. (The model's `_swish` module is shared
# by every block, so it runs many times per pass and cannot be attributed.)
EFFICIENTNET_LITE0_LAYERS = ("_blocks.2", "_blocks.4", "_blocks.10", "_bn1")
