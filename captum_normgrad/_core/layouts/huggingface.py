"""Hugging Face ``transformers`` vision models, laid out from their config and modules.

- ViT, DeiT (with teacher: class and distillation tokens), DINOv2 (with and without registers):
  tokens ``(N, T, C)`` after the embeddings, the prefix tokens (class, distillation, registers)
  counted from the model, on the patch grid of the call (read from the patch embedding's
  convolution: another input size with ``interpolate_pos_encoding`` has another grid); the patch
  embedding's own output has no prefix. Inside an attention only the projections hold tokens.
- Swin: tokens ``(N, H * W, C)`` at every stage, on the stage's grid (the call's patch grid halved
  once per patch merging); the window attention is refused.
- ConvNeXt: channels first, except the norm and the pointwise ``Linear`` layers inside a
  ``ConvNextLayer`` (channels last).

Blocks returning tuples (an attention, Swin's embeddings, blocks and stages) are attributed at
their hidden states, the entry :mod:`captum_normgrad._core.hidden_states` lists by class; a tuple
from any other module is refused by the capture.
"""

from __future__ import annotations

from torch import nn

from captum_normgrad._core.layouts.base import FIRST, LAST, Kind, inside_attention
from captum_normgrad._core.layouts.grid import ArchitectureGrid, GridSource, grid_of_conv_output

__all__ = ["REGISTRY"]


def _tokens(base: nn.Module, num_prefix_tokens: int, name: str, halvings: int = 0) -> Kind:
    """Tokens on the grid of the call, read from the patch embedding's convolution (ViT, DeiT and
    DINOv2 take other sizes with ``interpolate_pos_encoding``, Swin any size), halved once per
    patch merging before a Swin stage."""
    projection = base.embeddings.patch_embeddings.projection
    source = GridSource(projection, grid_of_conv_output, halvings)
    return ArchitectureGrid(num_prefix_tokens, None, name, source)


def _base_and_below(model: nn.Module, below: list[nn.Module]) -> tuple[nn.Module, list[nn.Module]]:
    """The backbone (the module with ``embeddings``) and the path below it."""
    if hasattr(model, "embeddings"):
        return model, below
    if below and hasattr(below[0], "embeddings"):
        return below[0], below[1:]
    return model, []


def _prefix_tokens(base: nn.Module) -> int:
    embeddings = base.embeddings
    prefix = 1 if getattr(embeddings, "cls_token", None) is not None else 0
    if getattr(embeddings, "distillation_token", None) is not None:
        prefix += 1
    registers = getattr(embeddings, "register_tokens", None)
    if registers is not None:
        prefix += registers.shape[1]
    return prefix


def _vit(model: nn.Module, below: list[nn.Module]) -> tuple[Kind, Kind]:
    base, inner = _base_and_below(model, below)
    if not inner:
        return FIRST, FIRST  # the model, a head or the pooler: (N, C)
    name = f"Hugging Face {type(model).__name__}"
    top = inner[0]
    if top is getattr(base, "pooler", None):
        return FIRST, FIRST
    if top is base.embeddings:
        patches = getattr(top, "patch_embeddings", None)
        if len(inner) >= 2 and inner[1] is patches:
            if len(inner) >= 3:
                return FIRST, FIRST  # the projection
            return FIRST, _tokens(base, 0, name)
        if top is inner[-1]:
            return FIRST, _tokens(base, _prefix_tokens(base), name)
    refusal = inside_attention(inner, ("attention",))
    if refusal is not None:
        return refusal, refusal
    tokens = _tokens(base, _prefix_tokens(base), name)
    return tokens, tokens


def _swin(model: nn.Module, below: list[nn.Module]) -> tuple[Kind, Kind]:
    base, inner = _base_and_below(model, below)
    name = f"Hugging Face {type(model).__name__}"
    if not inner or inner[0] is getattr(base, "pooler", None):
        return FIRST, FIRST
    top = inner[0]
    if top is base.embeddings:
        patches = top.patch_embeddings
        if len(inner) >= 2 and inner[1] is patches:
            return FIRST, FIRST if len(inner) >= 3 else _tokens(base, 0, name)
        tokens = _tokens(base, 0, name)
        return tokens, tokens
    refusal = inside_attention(inner, ("attention",), windowed=True)
    if refusal is not None:
        return refusal, refusal
    stages = list(base.encoder.layers)
    halvings_in = halvings_out = len(stages) - 1  # the final layernorm: after the last stage
    stage = next((m for m in inner if any(m is s for s in stages)), None)
    if stage is not None:
        index = next(i for i, s in enumerate(stages) if s is stage)
        halvings_in = halvings_out = index
        if stage.downsample is not None and stage is inner[-1]:
            halvings_out = index + 1  # the stage's hidden states come out of its patch merging
        elif stage.downsample is not None and any(m is stage.downsample for m in inner):
            halvings_out = index + 1
            inside = inner.index(stage.downsample) < len(inner) - 1
            halvings_in = halvings_out if inside else index

    return _tokens(base, 0, name, halvings_in), _tokens(base, 0, name, halvings_out)


def _convnext(model: nn.Module, below: list[nn.Module]) -> tuple[Kind, Kind]:
    layer = next((m for m in below if type(m).__name__ == "ConvNextLayer"), None)
    if layer is None or layer is below[-1]:
        return FIRST, FIRST
    inside = below[below.index(layer) + 1]
    if any(inside is getattr(layer, part) for part in ("layernorm", "pwconv1", "act", "pwconv2")):
        return LAST, LAST
    return FIRST, FIRST


_VIT_FAMILY = [
    "vit.modeling_vit.ViTModel",
    "vit.modeling_vit.ViTForImageClassification",
    "deit.modeling_deit.DeiTModel",
    "deit.modeling_deit.DeiTForImageClassification",
    "deit.modeling_deit.DeiTForImageClassificationWithTeacher",
    "dinov2.modeling_dinov2.Dinov2Model",
    "dinov2.modeling_dinov2.Dinov2ForImageClassification",
    "dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersModel",
    "dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersForImageClassification",
]

REGISTRY = {
    **{f"transformers.models.{path}": _vit for path in _VIT_FAMILY},
    "transformers.models.swin.modeling_swin.SwinModel": _swin,
    "transformers.models.swin.modeling_swin.SwinForImageClassification": _swin,
    "transformers.models.convnext.modeling_convnext.ConvNextModel": _convnext,
    "transformers.models.convnext.modeling_convnext.ConvNextForImageClassification": _convnext,
}
