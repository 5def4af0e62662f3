"""NormGrad order 0 on a real convolution (the paper's "general filter shapes").

Written as a matrix product ``X'' = iota(x') W`` (``iota`` = im2row), a convolution's weight gradient is
the sum over output locations ``u`` of ``g_u patch_u^T``. Location ``u``'s term has Frobenius norm
``||patch_u|| * ||g_u||`` (for grouped convolutions, the root of the sum over groups of the squared
per-group products), and that score is accumulated onto every input pixel of its patch. The map is at
the convolution's *input* resolution.

Both steps are convolutions with a kernel of ones, so no ``(N, C k, L)`` patch tensor is built:
``||patch_u||^2`` is the convolution of ``x^2`` with ones (per group), and the accumulation onto the
patch is the transposed convolution of the scores with ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_normgrad._core.captum import TargetType, log_usage
from captum_normgrad._core.capture import LayerRecord
from captum_normgrad.losses import LossSpec
from captum_normgrad.normgrad import LayerNormGrad

__all__ = ["LayerNormGradConv", "conv_normgrad_map", "linear_normgrad_scores"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_PAD_MODE = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}


def _safe_sqrt(squared: Tensor) -> Tensor:
    """``sqrt`` whose gradient at 0 is 0, not infinite (zero patches are common after a ReLU)."""
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, 1).sqrt(), 0)


def _pad_as_conv(conv: nn.Module, layer_input: Tensor) -> Tensor:
    """The input as the convolution really sees it, padding included (any ``padding_mode``)."""
    padding = conv._reversed_padding_repeated_twice
    if not any(padding):
        return layer_input
    return F.pad(layer_input, padding, mode=_PAD_MODE[conv.padding_mode])


def _onto_unpadded(conv: nn.Module, layer_input: Tensor, on_padded: Tensor) -> Tensor:
    """Move scores from padded positions back onto the pixels they copy.

    A zero-padded position copies nothing and is dropped; a reflected, replicated or circular one is
    a copy of a real pixel, whose score it joins. That is exactly the adjoint of the padding map.
    """
    padding = conv._reversed_padding_repeated_twice
    if not any(padding):
        return on_padded
    probe = torch.zeros(
        (1, 1, *layer_input.shape[2:]), dtype=on_padded.dtype, device=on_padded.device
    ).expand(on_padded.shape[0], -1, *layer_input.shape[2:])
    with torch.enable_grad():
        probe = probe.detach().requires_grad_()
        padded = F.pad(probe, padding, mode=_PAD_MODE[conv.padding_mode])
        (unpadded,) = torch.autograd.grad(
            padded, probe, grad_outputs=on_padded, create_graph=on_padded.requires_grad
        )
    return unpadded


def conv_normgrad_map(conv: nn.Module, layer_input: Tensor, output_gradient: Tensor) -> Tensor:
    """The general-filter NormGrad map of ``conv`` at its input resolution.

    Args:
        conv: an ``nn.Conv1d/2d/3d`` (any kernel, stride, padding, dilation, groups, padding mode).
        layer_input: what the convolution received, ``(N, C_in, *S_in)``.
        output_gradient: ``d loss / d output``, ``(N, C_out, *S_out)``.

    Returns:
        ``(N, 1, *S_in)``: for each input pixel, the sum of ``||g_u patch_u^T||_F`` over the output
        locations ``u`` whose patch contains it.
    """
    location_dims = layer_input.dim() - 2
    groups = conv.groups
    kernel_size = conv.weight.shape[2:]
    padded_input = _pad_as_conv(conv, layer_input)
    ones_per_group = torch.ones(
        (groups, layer_input.shape[1] // groups, *kernel_size),
        dtype=layer_input.dtype,
        device=layer_input.device,
    )
    patch_norm_squared = _CONV[location_dims](
        padded_input.square(),
        ones_per_group,
        stride=conv.stride,
        dilation=conv.dilation,
        groups=groups,
    )  # (N, groups, *S_out)
    gradient_norm_squared = output_gradient.square().unflatten(1, (groups, -1)).sum(dim=2)
    location_scores = _safe_sqrt(
        (patch_norm_squared * gradient_norm_squared).sum(dim=1, keepdim=True)
    )
    ones_kernel = torch.ones(
        (1, 1, *kernel_size), dtype=layer_input.dtype, device=layer_input.device
    )
    on_padded = _CONV_TRANSPOSE[location_dims](
        location_scores, ones_kernel, stride=conv.stride, dilation=conv.dilation
    )
    # Trailing pixels no patch reached (stride not dividing the size) get no score.
    missing = [
        padded - reached for padded, reached in zip(padded_input.shape[2:], on_padded.shape[2:])
    ]
    on_padded = F.pad(on_padded, [side for size in reversed(missing) for side in (0, size)])
    return _onto_unpadded(conv, layer_input, on_padded)


def linear_normgrad_scores(layer_input: Tensor, output_gradient: Tensor) -> Tensor:
    """Per-token ``||x_in,t|| * ||g_out,t||`` of an ``nn.Linear``: ``(N, *S, C) -> (N, *S)``.

    A ``Linear`` applied to every token is a 1x1 convolution over the tokens: its weight gradient
    is the sum over tokens ``t`` of ``g_out,t x_in,t^T``, whose Frobenius norm is this product.
    """
    input_norm = torch.linalg.vector_norm(layer_input, dim=-1)
    return input_norm * torch.linalg.vector_norm(output_gradient, dim=-1)


class LayerNormGradConv(LayerNormGrad):
    r"""NormGrad on a layer's own weight: a real ``nn.Conv1d/2d/3d`` (per-location
    ``||patch_u|| * ||g_u||``, accumulated onto every input pixel of the patch, the paper's "general
    filter shapes") or an ``nn.Linear`` applied per token (``||x_in,t|| * ||g_out,t||``).

    Unlike :class:`LayerNormGrad`, which inserts a virtual 1x1 identity, this scores the layer's own
    weight-gradient terms, so a convolution's map is at its *input* resolution and reflects its
    kernel, stride, dilation and groups. A per-token ``Linear`` (a transformer's MLP or projection)
    is a 1x1 convolution over tokens, hence its place here: its map is one score per token, laid on
    the grid by the layer's reshape transform (chosen from a torchvision ViT / Swin, or given), and
    a ``Linear`` on ``(N, C)`` gives ``(N, 1)``. It is the exact form of the paper for that layer,
    where :class:`LayerNormGrad` at the ``Linear`` would use its output instead of its input.
    ``attribute_to_layer_input`` does not apply. Same arguments as :class:`LayerNormGrad`
    otherwise; ``layer`` must be one or more convolutions or linear layers, and
    ``reshape_transform`` concerns only the linear ones (a convolution is channels first).

    Example:
        >>> model = torchvision.models.vgg16().eval()
        >>> normgrad = LayerNormGradConv(model, model.features[28])
        >>> normgrad.attribute(images, target=281).shape   # input of features[28]: 14x14
        torch.Size([2, 1, 14, 14])
    """

    _keeps_layer_input = True

    def _check_layers(self, layers: list[nn.Module]) -> None:
        for layer in layers:
            if not isinstance(layer, (*_CONV_TYPES, nn.Linear)):
                raise TypeError(
                    f"LayerNormGradConv needs nn.Conv1d, nn.Conv2d, nn.Conv3d or nn.Linear layers, "
                    f"got {type(layer).__name__}; use LayerNormGrad (virtual 1x1 identity) elsewhere"
                )
        for module, layout in zip(layers, self.layouts):
            if isinstance(module, _CONV_TYPES) and layout.transform is not None:
                raise ValueError(
                    f"layer '{layout.name}' is a convolution, channels first by definition, but "
                    "has a reshape_transform; give a list with None for the convolutions"
                )

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: object = None,
        attribute_to_layer_input: bool = False,
        loss: LossSpec = "cross_entropy",
        create_graph: bool = False,
    ) -> Tensor | list[Tensor]:
        if attribute_to_layer_input:
            raise ValueError(
                "LayerNormGradConv's map is already at the convolution's input; "
                "attribute_to_layer_input does not apply"
            )
        return super().attribute(inputs, target, additional_forward_args, False, loss, create_graph)

    attribute.__doc__ = LayerNormGrad.attribute.__doc__

    def _layer_map(self, record: LayerRecord) -> Tensor:
        if isinstance(record.layer, _CONV_TYPES):
            return conv_normgrad_map(record.layer, record.layer_input, record.gradient)
        scores = linear_normgrad_scores(record.layer_input, record.gradient)
        if scores.dim() == 1:
            return scores[:, None]
        layout = self.layouts[self.layers.index(record.layer)]
        layout.check_patches_reach_loss(record.gradient)
        return layout.channels_first(scores[..., None])
