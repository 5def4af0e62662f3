"""Layouts without a reshape_transform: the right map, or a clear error, never a norm over the wrong
axis. And the ready transforms themselves."""

from __future__ import annotations

import pytest
import torch
from model_state import assert_model_unchanged, model_snapshot
from torch import nn
from transformer_models import activation_and_gradient, last_dim_norm, tiny_vit

from captum_normgrad import (
    LayerNormGrad,
    LayerNormGradConv,
    LayerNormGradOrder1,
    LayerNormGradSelective,
    TokensToGrid,
    channels_last_to_first,
    tokens_to_grid,
)
from captum_normgrad.training import NormGradMonitor


class TokenModel(nn.Module):
    """A hand-made transformer (no torchvision class to recognise): tokens (N, 16, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, pixels):  # (N, 3, 4, 4) -> 16 tokens
        tokens = self.embed(pixels.flatten(2).transpose(1, 2))
        return self.head(self.norm(self.mlp(self.encoder(tokens))).mean(dim=1))


class ChannelsLastModel(nn.Module):
    """A hand-made NHWC stage: (N, 4, 4, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, pixels):
        return self.head(self.norm(self.proj(pixels.permute(0, 2, 3, 1))).mean(dim=(1, 2)))


class AttentionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.attention(tokens, tokens, tokens)[0].mean(dim=1))


class SignalModel(nn.Module):
    """Conv1d: (N, C, L) keeps channels at dim 1, even with an nn.Linear head nearby."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 5, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(5, 3)

    def forward(self, signal):
        return self.head(self.act(self.conv(signal)).mean(dim=2))


@pytest.fixture
def token_problem(one_thread):
    return TokenModel().double(), torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 2])


@pytest.mark.parametrize("which", ["encoder", "mlp", "gelu", "linear", "norm"])
def test_unknown_token_layers_are_refused_with_shape_and_transform(token_problem, which):
    model, pixels, labels = token_problem
    layer = {
        "encoder": model.encoder,
        "mlp": model.mlp,
        "gelu": model.mlp[1],
        "linear": model.mlp[0],
        "norm": model.norm,
    }[which]
    for method in (LayerNormGrad, LayerNormGradSelective, LayerNormGradOrder1):
        with pytest.raises(
            ValueError, match=r"layer '.*' has an activation of shape \(.*TokensToGrid"
        ):
            method(model, layer).attribute(pixels, target=labels)
    with NormGradMonitor(model, layer) as monitor, pytest.raises(ValueError, match="TokensToGrid"):
        model(pixels)
    assert monitor.latest is None


class ChannelsLastLinear(nn.Module):
    """(N, 4, 4, 6) after a per-pixel Linear: made of what the factored passes run."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, pixels):
        return self.head(torch.relu(self.proj(pixels.permute(0, 2, 3, 1))).mean(dim=(1, 2)))


@pytest.mark.parametrize("batch_mode, examples_run", [("loop", 1), ("factored", 2)])
def test_order1_refuses_an_unknown_layout_after_the_first_example_not_the_whole_batch(
    batch_mode, examples_run, one_thread
):
    """A channels-last layer without a transform is refused once the first example (loop) or
    chunk (factored, 2 examples) has run its four passes, not after all six examples."""
    model = ChannelsLastLinear().double()
    seen = []
    forward = model.head.forward

    def counted(x):  # not a hook (the factored mode refuses those)
        if not x.is_meta:  # "auto"'s shape-only forward on the meta device does not count
            seen.append(x.shape[0])
        return forward(x)

    model.head.forward = counted
    pixels = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer 'proj' has an activation of shape"):
        LayerNormGradOrder1(model, model.proj).attribute(
            pixels, target=[0, 1, 2, 0, 1, 2], batch_mode=batch_mode, chunk_size=2
        )
    assert sum(seen) == 4 * examples_run


def test_unknown_per_token_linear_is_refused_by_the_conv_form(token_problem):
    model, pixels, labels = token_problem
    with pytest.raises(ValueError, match=r"mlp.0.*\(2, 16, 1\).*TokensToGrid"):
        LayerNormGradConv(model, model.mlp[0]).attribute(pixels, target=labels)


def test_with_a_transform_the_unknown_token_model_gives_the_grid_map(token_problem):
    model, pixels, labels = token_problem
    transform = TokensToGrid(num_prefix_tokens=0)
    maps = LayerNormGrad(model, model.encoder, reshape_transform=transform).attribute(
        pixels, target=labels
    )
    activation, gradient = activation_and_gradient(model, model.encoder, pixels, labels)
    expected = last_dim_norm(activation.reshape(2, 4, 4, 8)) * last_dim_norm(
        gradient.reshape(2, 4, 4, 8)
    )
    torch.testing.assert_close(maps, expected)
    # the per-token Linear in its exact form: ||x_in,t|| ||g_out,t|| on the grid
    linear = model.mlp[2]
    conv_form = LayerNormGradConv(model, linear, reshape_transform=transform).attribute(
        pixels, target=labels
    )
    linear_input, _ = activation_and_gradient(model, model.mlp[1], pixels, labels)
    _, linear_gradient = activation_and_gradient(model, linear, pixels, labels)
    expected = last_dim_norm(linear_input.reshape(2, 4, 4, 12)) * last_dim_norm(
        linear_gradient.reshape(2, 4, 4, 8)
    )
    torch.testing.assert_close(conv_form, expected)


def test_unknown_channels_last_layers_are_refused_then_right_with_the_transform(one_thread):
    model = ChannelsLastModel().double()
    pixels, labels = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.tensor([1, 0])
    for layer in (model.proj, model.norm):
        with pytest.raises(ValueError, match=r"\(2, 4, 4, 6\).*channels_last_to_first"):
            LayerNormGrad(model, layer).attribute(pixels, target=labels)
        maps = LayerNormGrad(model, layer, reshape_transform=channels_last_to_first).attribute(
            pixels, target=labels
        )
        activation, gradient = activation_and_gradient(model, layer, pixels, labels)
        torch.testing.assert_close(maps, last_dim_norm(activation) * last_dim_norm(gradient))


def test_multihead_attention_is_refused_at_construction():
    model = AttentionModel()
    with pytest.raises(TypeError, match="attention.*tuple.*ln_1"):
        LayerNormGrad(model, model.attention)
    vit = tiny_vit()
    with pytest.raises(TypeError, match="self_attention.*tuple"):
        LayerNormGradOrder1(vit, vit.encoder.layers[0].self_attention)


def test_conv1d_keeps_channels_at_dim_1(one_thread):
    model = SignalModel().double()
    signal, labels = torch.randn(2, 2, 5, dtype=torch.float64), torch.tensor([2, 0])
    for layer in (model.conv, model.act):
        maps = LayerNormGrad(model, layer).attribute(signal, target=labels)
        activation, gradient = activation_and_gradient(model, layer, signal, labels)
        expected = activation.norm(dim=1, keepdim=True) * gradient.norm(dim=1, keepdim=True)
        torch.testing.assert_close(maps, expected)


def test_identity_transform_is_the_escape_hatch(token_problem):
    """A user who knows the channels are at dim 1 says so; the map is then over dim 1."""
    model, pixels, labels = token_problem
    maps = LayerNormGrad(model, model.mlp, reshape_transform=lambda x: x).attribute(
        pixels, target=labels
    )
    assert maps.shape == (2, 1, 8)


def test_transform_lists_and_bad_transforms(token_problem):
    model, pixels, labels = token_problem
    grid = TokensToGrid(0)
    maps = LayerNormGrad(model, [model.encoder, model.mlp], reshape_transform=[grid, grid])
    assert [m.shape for m in maps.attribute(pixels, target=labels)] == [(2, 1, 4, 4)] * 2
    with pytest.raises(ValueError, match="2 transforms for 1 layers"):
        LayerNormGrad(model, [model.encoder], reshape_transform=[grid, grid])
    with pytest.raises(TypeError, match="reshape_transform must be a callable"):
        LayerNormGrad(model, model.encoder, reshape_transform="tokens")
    with pytest.raises(ValueError, match="same batch N"):
        LayerNormGrad(model, model.encoder, reshape_transform=lambda x: x[0]).attribute(
            pixels, target=labels
        )
    vit = tiny_vit()
    with pytest.raises(ValueError, match="conv_proj.*convolution"):
        LayerNormGradConv(vit, vit.conv_proj, reshape_transform=grid)


def test_model_untouched_on_transformers_also_when_refused(token_problem):
    vit = tiny_vit()
    vit.encoder.layers[0].ln_1.weight.grad = torch.ones(32, dtype=torch.float64)
    images, labels = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1])
    before = model_snapshot(vit)
    for method in (LayerNormGrad, LayerNormGradSelective, LayerNormGradOrder1):
        method(vit, vit.encoder.layers[0]).attribute(images, target=labels)
        with pytest.raises(RuntimeError, match="patch token"):
            method(vit, vit.encoder.layers[1]).attribute(images, target=labels)
    LayerNormGradConv(vit, [vit.conv_proj, vit.encoder.layers[0].mlp[3]]).attribute(
        images, target=labels
    )
    assert_model_unchanged(vit, before)
    assert torch.backends.mha.get_fastpath_enabled()
    model, pixels, labels = token_problem
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="TokensToGrid"):
        LayerNormGradOrder1(model, model.mlp).attribute(pixels, target=labels)
    assert_model_unchanged(model, before)


def test_tokens_to_grid_is_a_view_and_refuses_what_does_not_fit():
    tokens = torch.randn(2, 1 + 6, 5, requires_grad=True)
    grid = tokens_to_grid(tokens, num_prefix_tokens=1, grid_size=(2, 3))
    assert grid.shape == (2, 5, 2, 3)
    assert grid.untyped_storage().data_ptr() == tokens.untyped_storage().data_ptr()
    assert torch.equal(grid[1, :, 1, 0], tokens[1, 1 + 3])  # row 1, column 0 = patch token 3
    grid.sum().backward()  # differentiable
    assert torch.equal(tokens.grad[:, 0], torch.zeros(2, 5))
    with pytest.raises(ValueError, match="6 patch tokens.*square.*grid_size"):
        tokens_to_grid(tokens)
    with pytest.raises(ValueError, match=r"grid_size=\(2, 2\) holds 4"):
        tokens_to_grid(tokens, grid_size=(2, 2))
    with pytest.raises(ValueError, match="num_prefix_tokens=7 does not fit"):
        tokens_to_grid(tokens, num_prefix_tokens=7)
    with pytest.raises(ValueError, match="channels_last_to_first"):
        tokens_to_grid(torch.randn(2, 3, 3, 5))
    assert "num_prefix_tokens=5" in repr(TokensToGrid(5))
    nhwc = torch.randn(2, 3, 4, 5)
    moved = channels_last_to_first(nhwc)
    assert moved.shape == (2, 5, 3, 4) and moved.data_ptr() == nhwc.data_ptr()
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        channels_last_to_first(torch.randn(2, 5))
