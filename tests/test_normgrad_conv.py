"""LayerNormGradConv against an explicit per-location float64 reference (paper: general filters)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from captum_normgrad import LayerNormGradConv
from captum_normgrad.normgrad_conv import conv_normgrad_map

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def source_index(position: int, size: int, mode: str) -> int | None:
    """Which real pixel a (possibly padded) position copies, or None for a zero pad."""
    if 0 <= position < size:
        return position
    if mode == "zeros":
        return None
    if mode == "reflect":
        return -position if position < 0 else 2 * (size - 1) - position
    if mode == "replicate":
        return min(max(position, 0), size - 1)
    return position % size  # circular


def reference(conv: nn.Module, layer_input: torch.Tensor, output_gradient: torch.Tensor):
    """Per-location contributions g_u patch_u^T, their sum, and the accumulated norm map, by loops."""
    batch, in_channels, *in_size = layer_input.shape
    out_size = output_gradient.shape[2:]
    groups = conv.groups
    in_per_group, out_per_group = in_channels // groups, conv.out_channels // groups
    padding = conv._reversed_padding_repeated_twice[::2][::-1]  # per dim, first side
    weight_grad = torch.zeros_like(conv.weight)
    maps = torch.zeros(batch, 1, *in_size, dtype=layer_input.dtype)
    for n in range(batch):
        for u in itertools.product(*(range(s) for s in out_size)):
            contributions = []
            sources = {}
            patch = torch.zeros(in_channels, *conv.kernel_size, dtype=layer_input.dtype)
            for k in itertools.product(*(range(s) for s in conv.kernel_size)):
                position = [
                    u[d] * conv.stride[d] - padding[d] + k[d] * conv.dilation[d]
                    for d in range(len(u))
                ]
                source = [source_index(p, s, conv.padding_mode) for p, s in zip(position, in_size)]
                if None not in source:
                    patch[(slice(None), *k)] = layer_input[(n, slice(None), *source)]
                    sources[k] = tuple(source)
            for group in range(groups):
                g = output_gradient[
                    (n, slice(group * out_per_group, (group + 1) * out_per_group), *u)
                ]
                x = patch[group * in_per_group : (group + 1) * in_per_group]
                contributions.append(torch.einsum("o,i...->oi...", g, x))
            weight_grad += torch.cat(contributions)
            norm = torch.sqrt(sum(c.square().sum() for c in contributions))
            for source in sources.values():  # each distinct patch position of a real pixel
                maps[(n, 0, *source)] += norm
    return weight_grad, maps


CASES = [
    (1, dict(kernel_size=3, stride=2, padding=1)),
    (1, dict(kernel_size=2, dilation=2, groups=2, padding_mode="reflect", padding=2)),
    (2, dict(kernel_size=3, stride=2, padding=1, groups=2)),
    (2, dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), padding=(1, 0))),
    (2, dict(kernel_size=3, padding="same", padding_mode="circular")),
    (2, dict(kernel_size=3, padding=1, padding_mode="replicate", groups=2)),
    (3, dict(kernel_size=2, stride=2, padding=1, groups=2)),
]


@pytest.mark.parametrize("location_dims, options", CASES)
def test_matches_per_location_reference_and_sums_to_weight_gradient(location_dims, options):
    conv = CONV[location_dims](4, 6, bias=True, **options).double()
    layer_input = torch.randn(2, 4, *([5] * location_dims), dtype=torch.float64)
    output = conv(layer_input)
    output_gradient = torch.randn_like(output)
    (autograd_weight_grad,) = torch.autograd.grad(output, conv.weight, output_gradient)
    weight_grad, expected = reference(conv, layer_input, output_gradient)
    torch.testing.assert_close(weight_grad, autograd_weight_grad)  # the reference is right
    torch.testing.assert_close(conv_normgrad_map(conv, layer_input, output_gradient), expected)


def test_map_is_at_the_conv_input_and_uses_the_loss_gradient():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).double()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    conv_input = model[:2](images).detach()
    output = model[2](conv_input).detach().requires_grad_()
    loss = nn.functional.cross_entropy(model[3:](output.clone()), labels, reduction="sum")
    (gradient,) = torch.autograd.grad(loss, output)
    _, expected = reference(model[2], conv_input, gradient)
    maps = LayerNormGradConv(model, model[2]).attribute(images, target=labels)
    assert maps.shape == (2, 1, 8, 8)
    torch.testing.assert_close(maps, expected)


def test_one_by_one_conv_equals_the_virtual_identity_on_its_input():
    """With a 1x1 kernel the patch is the pixel: the map is ||x_u|| * ||g_u||, g at the output."""
    conv = nn.Conv2d(3, 5, 1).double()
    layer_input = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    gradient = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    expected = layer_input.norm(dim=1, keepdim=True) * gradient.norm(dim=1, keepdim=True)
    torch.testing.assert_close(conv_normgrad_map(conv, layer_input, gradient), expected)


def test_non_conv_layer_is_refused_by_type():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(TypeError, match="ReLU"):
        LayerNormGradConv(model, model[1])
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        LayerNormGradConv(model, nn.ConvTranspose2d(2, 2, 3))


def test_attribute_to_layer_input_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="attribute_to_layer_input"):
        LayerNormGradConv(model, model[0]).attribute(
            torch.randn(1, 3, 5, 5), target=0, attribute_to_layer_input=True
        )


def test_create_graph_through_zero_patches_gives_finite_gradients():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1),
        nn.Flatten(),
        nn.Linear(2 * 16, 2),
    ).double()
    images = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    images[..., :2, :2] = 1.0
    maps = LayerNormGradConv(model, model[2]).attribute(images, target=0, create_graph=True)
    (grad,) = torch.autograd.grad(maps.sum(), model[0].weight)
    assert torch.isfinite(grad).all()
