"""Modules that return a tuple whose one entry holds their activation, by class.

Hugging Face's attention blocks return ``(hidden_states, attention_weights)``, its Swin layers,
stages and embeddings ``(hidden_states, ..., output_dimensions)``. Which entry is the activation is
a fact of the architecture, listed here by class (looked up along the MRO); it is never guessed
from a tuple's contents, and a tuple from any other module is refused by the capture. Every hook
that records or taps a layer's output goes through :func:`activation_in` and
:func:`with_activation`, so the rest of the network gets the tuple back with the entry it would
have had.
"""

from __future__ import annotations

from torch import nn

from captum_normgrad._core.by_class import registered

__all__ = ["activation_in", "with_activation"]

_HF = "transformers.models"
#: Model class (``module.QualifiedName``) -> the entry of its output tuple that is its activation.
TUPLE_OUTPUTS: dict[str, int] = {
    f"{_HF}.vit.modeling_vit.ViTAttention": 0,
    f"{_HF}.deit.modeling_deit.DeiTAttention": 0,
    f"{_HF}.dinov2.modeling_dinov2.Dinov2Attention": 0,
    f"{_HF}.dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersAttention": 0,
    f"{_HF}.swin.modeling_swin.SwinPatchEmbeddings": 0,
    f"{_HF}.swin.modeling_swin.SwinEmbeddings": 0,
    f"{_HF}.swin.modeling_swin.SwinLayer": 0,
    f"{_HF}.swin.modeling_swin.SwinStage": 0,
}


def activation_in(module: nn.Module, output: object) -> object:
    """The activation in ``module``'s output: the listed entry of a listed module's tuple, else
    the output itself (which the caller checks is a tensor)."""
    entry = registered(TUPLE_OUTPUTS, module)
    if entry is not None and isinstance(output, tuple) and len(output) > entry:
        return output[entry]
    return output


def with_activation(module: nn.Module, output: object, activation: object) -> object:
    """``module``'s output with its activation replaced by ``activation`` (``None``: unchanged)."""
    if activation is None:
        return None
    entry = registered(TUPLE_OUTPUTS, module)
    if entry is not None and isinstance(output, tuple) and len(output) > entry:
        return (*output[:entry], activation, *output[entry + 1 :])
    return activation
