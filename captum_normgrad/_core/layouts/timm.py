"""timm's vision transformers, Swin and ConvNeXt, laid out from the model's own attributes.

- ``VisionTransformer`` and its relatives (DeiT distilled, registers, no class token, EVA): the
  patch embedding gives tokens without prefix (or ``(N, H, W, C)`` with ``dynamic_img_size``), every
  module after it tokens with ``model.num_prefix_tokens`` first, on ``model.patch_embed.grid_size``
  (another grid at call time with ``dynamic_img_size``). Inside an attention, only the projections
  hold tokens; the per-head tensors are refused.
- ``SwinTransformer``: channels last (``(N, H, W, C)``) from the patch embedding's norm to the final
  norm; inside a block the MLP runs on ``(N, H * W, C)`` tokens of the block's ``input_resolution``;
  the window attention (windows in the batch) is refused.
- ``ConvNeXt``: channels first, except the norm and MLP inside a ``ConvNeXtBlock`` without
  ``conv_mlp`` (channels last).
"""

from __future__ import annotations

from torch import nn

from captum_normgrad._core.layouts.base import FIRST, LAST, ArchitectureGrid, Kind, inside_attention

__all__ = ["REGISTRY"]


def _grid(model: nn.Module) -> tuple[int, int] | None:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return None if grid is None else (int(grid[0]), int(grid[1]))


def _vision_transformer(model: nn.Module, below: list[nn.Module]) -> tuple[Kind, Kind]:
    dynamic = bool(getattr(model, "dynamic_img_size", False))
    name = type(model).__name__
    if not below:
        return FIRST, FIRST
    top = below[0]
    if top is model.patch_embed:
        if len(below) >= 2 and below[1] is getattr(top, "proj", None):
            return FIRST, FIRST
        tokens = ArchitectureGrid(0, _grid(model), f"timm {name}", dynamic)
        return FIRST if top is below[-1] else tokens, tokens
    if any(
        top is getattr(model, part, None)
        for part in ("attn_pool", "fc_norm", "head_drop", "head", "head_dist")
    ):
        return FIRST, FIRST  # after the pooling: (N, C)
    refusal = inside_attention(below, ("attn",))
    if refusal is not None:
        return refusal, refusal
    tokens = ArchitectureGrid(model.num_prefix_tokens, _grid(model), f"timm {name}", dynamic)
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
    grid = None if block is None else tuple(int(s) for s in block.input_resolution)
    kind = ArchitectureGrid(0, grid, "timm SwinTransformer")
    return kind, kind


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
