"""NormGrad saliency for Captum users: order 0, order 1 and the adversarial map, as Captum
``LayerAttribution`` methods, with metrics and training-time tools."""

from captum_normgrad.combine import combine_layer_maps, normalize_per_example, upsample_maps
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
