"""The layout of a module in a model no registry knows: from the module that produced it.

A module acting on the last dim (``nn.Linear``, ``nn.LayerNorm`` over one size, ``nn.RMSNorm``, a
batch-first ``nn.Transformer*`` layer, ``nn.Embedding``) puts the channels last; one acting on dim
1 (a convolution, a batch, group or instance norm, a pooling, timm's ``LayerNorm2d``) first; a
torchvision ``Permute`` says what it does. A leaf that decides nothing and holds no parameters (an
activation, a dropout) is judged by the deciding module registered before it
in its container (an ``nn.Sequential``'s order is its forward's), else by its container; a
container by its last deciding child in an ``nn.Sequential``, by its children where they all agree
in other containers. Channels last in a model no registry knows is refused with the transform to
pass (its token grid is not known). Sizes never decide: a layout left undecided is refused where
the activation has more than one axis that could be the channels.
"""

from __future__ import annotations

from torch import nn

from captum_normgrad._core.by_class import qualified_name
from captum_normgrad._core.layouts.base import FIRST, LAST, Kind, Refusal, permute_kind

__all__ = ["generic_kinds"]

_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.LocalResponseNorm,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Upsample,
)
_TRANSFORMER_LAYERS = (
    nn.TransformerEncoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoderLayer,
    nn.TransformerDecoder,
    nn.Transformer,
)
# LayerNorm subclasses that normalise over dim 1, by class (timm, Hugging Face ConvNeXt's own).
_CHANNELS_FIRST_NORMS = ("timm.layers.norm.LayerNorm2d", "timm.layers.norm.RmsNorm2d")

_SEQUENCE_FIRST = Refusal(
    "it comes from an nn.Transformer layer with batch_first=False: (T, N, C), sequence first",
    "Pass a reshape_transform that moves the batch first and the channels to dim 1",
)


def _own_kind(module: nn.Module) -> Kind | None:
    """What ``module`` alone says about its output's layout, or ``None``."""
    if isinstance(module, _CHANNELS_FIRST) or qualified_name(type(module)) in _CHANNELS_FIRST_NORMS:
        return FIRST
    if isinstance(module, nn.LayerNorm):
        data_format = getattr(module, "data_format", None)
        if data_format in ("channels_first", "channels_last"):
            return FIRST if data_format == "channels_first" else LAST
        if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
            return LAST
        return None
    if isinstance(module, (nn.Linear, nn.Embedding)) or type(module) is getattr(nn, "RMSNorm", ()):
        return LAST
    if isinstance(module, _TRANSFORMER_LAYERS):
        attention = next(m for m in module.modules() if isinstance(m, nn.MultiheadAttention))
        return LAST if attention.batch_first else _SEQUENCE_FIRST
    kind = permute_kind(module, None)
    if kind is not None:
        return kind
    if module._modules:
        return _container_kind(module)
    return None


def _container_kind(module: nn.Module) -> Kind | None:
    children = [child for child in module.children() if child is not None]
    if isinstance(module, nn.Sequential):
        for child in reversed(children):
            kind = _own_kind(child)
            if kind is not None:
                return kind
        return None
    kinds = {kind for kind in map(_own_kind, children) if kind is not None}
    if len(kinds) == 1:
        return kinds.pop()
    return None


def _kind_at(path: list[nn.Module]) -> Kind | None:
    """The layout of ``path[-1]``'s output: its own, else its producer's (the deciding module
    registered before it in its container: a Sequential's order is its forward's; elsewhere the
    registration order stands for it), else its container's, up the path."""
    kind = _own_kind(path[-1])
    if kind is not None or path[-1]._modules or next(path[-1].parameters(), None) is not None:
        return kind  # a container or a module with parameters of its own decides by itself
    for depth in range(len(path) - 1, 0, -1):
        parent, child = path[depth - 1], path[depth]
        siblings = list(parent.children())
        for sibling in reversed(siblings[: siblings.index(child)]):
            kind = _own_kind(sibling)
            if kind is not None:
                return kind
        if depth > 1:
            kind = _container_kind(parent)
            if kind is not None:
                return kind
    return None


def generic_kinds(path: list[nn.Module] | None, layer: nn.Module) -> tuple[Kind, Kind]:
    """The layouts of ``layer``'s input and output in a model no registry knows."""
    kind = _kind_at(path if path is not None else [layer, layer])
    if kind is None:
        kind = Refusal(
            f"nothing in {type(layer).__name__} or the modules that produce its output says "
            "which axis holds the channels"
        )
    elif kind == LAST:
        kind = Refusal(
            f"its channels are last (it is or comes from a module acting on the last dim, in "
            f"{type(layer).__name__}), and this model's token grid is not known"
        )
    input_kind = kind
    flipped = permute_kind(layer, None)
    if flipped == FIRST:
        input_kind = Refusal("its input is channels last (a Permute to channels first)")
    elif flipped == LAST:
        input_kind = FIRST
    return input_kind, kind
