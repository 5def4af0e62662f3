"""timm's vision transformers, Swin and ConvNeXt, laid out from the model's own attributes.

- ``VisionTransformer`` and its relatives (DeiT distilled, registers, no class token, EVA): the
  patch embedding gives tokens without prefix (or ``(N, H, W, C)`` with ``dynamic_img_size``), every
  module after it tokens with ``model.num_prefix_tokens`` first, on ``model.patch_embed.grid_size``
  (the call's grid, read from the patch embedding's convolution: another input size with
  ``dynamic_img_size`` has another grid). Inside an attention, only the projections hold tokens;
  the per-head tensors are refused.
- ``SwinTransformer``: channels last (``(N, H, W, C)``) from the patch embedding's norm to the final
  norm; inside a block the norm and MLP run on ``(N, H * W, C)`` tokens of the grid of the block's
  input (read from the call);
  the window attention (windows in the batch) is refused.
- ``ConvNeXt``: channels first, except the norm and MLP inside a ``ConvNeXtBlock`` without
  ``conv_mlp`` (channels last).
"""

from __future__ import annotations

from torch import nn

from captum_normgrad._core.layouts.base import (
    FIRST,
    LAST,
    Kind,
    Refusal,
    inside_attention,
)
from captum_normgrad._core.layouts.grid import (
    ArchitectureGrid,
    GridSource,
    grid_of_channels_last_input,
    grid_of_conv_output,
)

__all__ = ["REGISTRY"]


def _tokens(model: nn.Module, num_prefix_tokens: int) -> Kind:
    """Tokens on the grid of the call, read from the patch embedding's convolution; the configured
    grid for an embedding without one, unless the model takes other sizes (then refused)."""
    name = f"timm {type(model).__name__}"
    proj = getattr(model.patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d):
        return ArchitectureGrid(
            num_prefix_tokens, None, name, GridSource(proj, grid_of_conv_output)
        )
    grid = getattr(model.patch_embed, "grid_size", None)
    if grid is None or getattr(model, "dynamic_img_size", False):
        return Refusal(
            f"the patch grid of this {name} (a {type(model.patch_embed).__name__} patch embedding) "
            "cannot be read from the call",
            f"Pass reshape_transform=TokensToGrid(num_prefix_tokens={num_prefix_tokens}, "
            "grid_size=(h, w))",
        )
    return ArchitectureGrid(num_prefix_tokens, (int(grid[0]), int(grid[1])), name)


def _vision_transformer(model: nn.Module, below: list[nn.Module]) -> tuple[Kind, Kind]:
    if not below:
        return FIRST, FIRST
    top = below[0]
    if top is model.patch_embed:
        if len(below) >= 2 and below[1] is getattr(top, "proj", None):
            return FIRST, FIRST
        tokens = _tokens(model, 0)
        return FIRST if top is below[-1] else tokens, tokens
    if any(
        top is getattr(model, part, None)
        for part in ("attn_pool", "fc_norm", "head_drop", "head", "head_dist")
    ):
        return FIRST, FIRST  # after the pooling: (N, C)
    refusal = inside_attention(below, ("attn",))
    if refusal is not None:
        return refusal, refusal
    tokens = _tokens(model, model.num_prefix_tokens)
    return tokens, tokens


def _swin(model: nn.Module, below: list[nn.Module]) -> tuple[Kind, Kind]:
    if not below:
        return FIRST, FIRST
    top = below[0]
    if top is model.patch_embed:
        if len(below) >= 2 and below[1] is top.proj:
            return FIRST, FIRST
        return FIRST if top is below[-1] else LAST, LAST
    if top is model.head:  # the pooling reads (N, H, W, C), the rest (N, C)
        reads_stage = len(below) == 1 or below[1] is getattr(top, "global_pool", None)
        return LAST if reads_stage else FIRST, FIRST
    refusal = inside_attention(below, ("attn",), windowed=True)
    if refusal is not None:
        return refusal, refusal
    block = next((m for m in below if type(m).__name__ == "SwinTransformerBlock"), None)
    if block is None:  # a stage, a patch merging: (N, H, W, C)
        return LAST, LAST
    # Inside a block, the MLP and its norm see (N, H * W, C) on the grid of the block's input.
    tokens = ArchitectureGrid(
        0,
        None,
        "timm SwinTransformer",
        GridSource(block, grid_of_channels_last_input, from_input=True),
    )
    return (LAST, LAST) if block is below[-1] else (tokens, tokens)


def _convnext(model: nn.Module, below: list[nn.Module]) -> tuple[Kind, Kind]:
    block = next((m for m in below if type(m).__name__ == "ConvNeXtBlock"), None)
    if block is None or block is below[-1] or getattr(block, "use_conv_mlp", True):
        return FIRST, FIRST
    inside = below[below.index(block) + 1]
    if inside is block.norm or inside is block.mlp:
        return LAST, LAST
    return FIRST, FIRST


REGISTRY = {
    "timm.models.vision_transformer.VisionTransformer": _vision_transformer,
    "timm.models.eva.Eva": _vision_transformer,
    "timm.models.swin_transformer.SwinTransformer": _swin,
    "timm.models.convnext.ConvNeXt": _convnext,
}
