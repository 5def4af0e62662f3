"""torchvision's transformers, from module types alone: ``VisionTransformer`` (its encoder: tokens,
class token dropped, grid ``image_size / patch_size``), ``SwinTransformer`` (``features`` and
``norm``: channels last) and ``ConvNeXt`` (channels last inside a ``CNBlock`` between its two
``Permute`` modules)."""

from __future__ import annotations

from torch import nn

from captum_normgrad._core.layouts.base import FIRST, LAST, Kind, follow_permutes
from captum_normgrad.reshape import TokensToGrid

__all__ = ["REGISTRY"]


def _vision_transformer(model: nn.Module, below: list[nn.Module]) -> tuple[Kind, Kind]:
    if below and below[0] is model.encoder:
        side = model.image_size // model.patch_size
        tokens = TokensToGrid(num_prefix_tokens=1, grid_size=(side, side))
        return tokens, tokens
    return FIRST, FIRST


def _swin(model: nn.Module, below: list[nn.Module]) -> tuple[Kind, Kind]:
    # features turn the image channels last; the final norm and permute come after them.
    after_features = below and any(below[0] is m for m in (model.norm, model.permute))
    return follow_permutes(below, LAST if after_features else FIRST)


def _convnext(model: nn.Module, below: list[nn.Module]) -> tuple[Kind, Kind]:
    return follow_permutes(below, FIRST)


REGISTRY = {
    "torchvision.models.vision_transformer.VisionTransformer": _vision_transformer,
    "torchvision.models.swin_transformer.SwinTransformer": _swin,
    "torchvision.models.convnext.ConvNeXt": _convnext,
}
