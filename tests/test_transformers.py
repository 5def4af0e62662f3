"""NormGrad on torchvision ViT, Swin and ConvNeXt against an independent float64 reference: tokens laid
on the grid (class token dropped) or channels moved first, norms over the channel axis."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from transformer_models import (
    activation_and_gradient,
    grid_of,
    last_dim_norm,
    order1_reference,
    tiny_convnext,
    tiny_swin,
    tiny_vit,
)

from captum_normgrad import (
    LayerNormGrad,
    LayerNormGradAdversarial,
    LayerNormGradConv,
    LayerNormGradOrder1,
    LayerNormGradSelective,
    TokensToGrid,
)
from captum_normgrad.training import NormGradMonitor


@pytest.fixture
def vit_problem(one_thread):
    model = tiny_vit()
    return model, torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 4, 0])


@pytest.fixture
def swin_problem(one_thread):
    model = tiny_swin()
    # 16 x 24 pixels: a 4 x 6 grid, so a swapped height and width cannot pass.
    return model, torch.randn(2, 3, 16, 24, dtype=torch.float64), torch.tensor([3, 1])


def vit_grid(tokens):
    return grid_of(tokens, prefix=1, height=4, width=4)


@pytest.mark.parametrize("block", [0, 1])
def test_vit_order0_equals_the_reference(vit_problem, block):
    model, images, labels = vit_problem
    # block 0's output, and the last block's first LayerNorm (its patch tokens reach the loss).
    layer = model.encoder.layers[0] if block == 0 else model.encoder.layers[1].ln_1
    activation, gradient = activation_and_gradient(model, layer, images, labels)
    expected = last_dim_norm(vit_grid(activation)) * last_dim_norm(vit_grid(gradient))
    maps = LayerNormGrad(model, layer).attribute(images, target=labels)
    assert maps.shape == (3, 1, 4, 4)
    torch.testing.assert_close(maps, expected)


def test_vit_selective_equals_the_reference(vit_problem):
    model, images, labels = vit_problem
    layer = model.encoder.layers[0].mlp
    activation, gradient = activation_and_gradient(model, layer, images, labels)
    expected = last_dim_norm(torch.relu(vit_grid(activation) * -vit_grid(gradient)))
    maps = LayerNormGradSelective(model, layer).attribute(images, target=labels)
    torch.testing.assert_close(maps, expected)


@pytest.mark.parametrize(
    ("method", "sign", "batch_mode"),
    [
        (LayerNormGradOrder1, 1, "loop"),
        (LayerNormGradOrder1, 1, "vmap"),
        (LayerNormGradAdversarial, -1, "loop"),
    ],
)
def test_vit_order1_equals_the_formula(vit_problem, method, sign, batch_mode):
    """torch.func through torchvision's attention (scaled_dot_product_attention), loop and vmap."""
    model, images, labels = vit_problem
    layer = model.encoder.layers[0]
    eps = 0.05  # large enough for a visible correction
    expected = order1_reference(model, layer, images, labels, vit_grid, eps, h_scale=0.5, sign=sign)
    maps = method(model, layer).attribute(images, target=labels, eps=eps, batch_mode=batch_mode)
    torch.testing.assert_close(maps, expected)
    order0 = LayerNormGrad(model, layer).attribute(images, target=labels)
    assert (maps - order0).abs().max() > 1e-3 * order0.abs().max()


def test_vit_exact_hvp_agrees_with_a_small_finite_difference(vit_problem):
    """The exact HVP is a forward-mode derivative through attention (the math SDPA kernel)."""
    model, images, labels = vit_problem
    order1 = LayerNormGradOrder1(model, model.encoder.layers[0])
    exact = order1.attribute(images, target=labels, eps=0.05, hvp="exact")
    finite = order1.attribute(images, target=labels, eps=0.05, h_scale=1e-4)
    torch.testing.assert_close(exact, finite, rtol=1e-6, atol=1e-9)


def test_swin_order0_and_order1_equal_the_reference(swin_problem):
    model, images, labels = swin_problem
    stage, mlp_linear = model.features[1], model.features[1][0].mlp[0]
    maps = LayerNormGrad(model, [stage, mlp_linear]).attribute(images, target=labels)
    for layer, layer_map in zip([stage, mlp_linear], maps):
        activation, gradient = activation_and_gradient(model, layer, images, labels)
        torch.testing.assert_close(layer_map, last_dim_norm(activation) * last_dim_norm(gradient))
        assert layer_map.shape == (2, 1, 4, 6)
    order1 = LayerNormGradOrder1(model, stage).attribute(images, target=labels, eps=0.05)
    expected = order1_reference(model, stage, images, labels, lambda x: x, 0.05, 0.5)
    torch.testing.assert_close(order1, expected)


def test_real_vit_b_16_and_swin_t_order0(one_thread):
    """The real architectures (random weights, small images), float32."""
    vit = torchvision.models.vit_b_16(image_size=32, num_classes=4).eval()
    torch.nn.init.normal_(vit.heads.head.weight, std=0.02)
    swin = torchvision.models.swin_t(num_classes=4).eval()
    labels = torch.tensor([2, 0])
    for model, layer, size, layout in [
        (vit, vit.encoder.layers[5], 32, lambda t: grid_of(t, 1, 2, 2)),
        (swin, swin.features[3], 64, lambda t: t),
    ]:
        images = torch.randn(2, 3, size, size)
        activation, gradient = activation_and_gradient(model, layer, images, labels)
        expected = last_dim_norm(layout(activation)) * last_dim_norm(layout(gradient))
        maps = LayerNormGrad(model, layer).attribute(images, target=labels)
        torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6 * expected.max().item())


def test_convnext_block_internals_are_channels_last_and_the_block_channels_first(one_thread):
    model = tiny_convnext()
    images, labels = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 2])
    block = model.features[1][0]
    layers = [block.block[0], block.block[2], block.block[3], block]
    maps = LayerNormGrad(model, layers).attribute(images, target=labels)
    for layer, layer_map in zip(layers, maps):
        activation, gradient = activation_and_gradient(model, layer, images, labels)
        channels_last = layer in (block.block[2], block.block[3])
        if not channels_last:
            activation, gradient = activation.movedim(1, -1), gradient.movedim(1, -1)
        torch.testing.assert_close(layer_map, last_dim_norm(activation) * last_dim_norm(gradient))
        assert layer_map.shape == (2, 1, 8, 8)


def test_conv_form_on_the_patch_embedding_and_a_per_token_linear(vit_problem):
    """conv_proj (kernel = stride = patch): each pixel gets its patch's ||patch|| ||g||; the MLP's
    first Linear: ||x_in,t|| ||g_out,t|| per token, on the grid."""
    model, images, labels = vit_problem
    linear = model.encoder.layers[0].mlp[0]
    patch_map, token_map = LayerNormGradConv(model, [model.conv_proj, linear]).attribute(
        images, target=labels
    )
    _, gradient = activation_and_gradient(model, model.conv_proj, images, labels)
    patches = images.unfold(2, 8, 8).unfold(3, 8, 8)  # (N, 3, 4, 4, 8, 8)
    patch_norm = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).norm(dim=-1)
    scores = patch_norm * gradient.norm(dim=1)  # (N, 4, 4)
    expected = scores.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1)
    torch.testing.assert_close(patch_map, expected)
    linear_input, _ = activation_and_gradient(model, model.encoder.layers[0].ln_2, images, labels)
    _, linear_gradient = activation_and_gradient(model, linear, images, labels)
    expected = last_dim_norm(vit_grid(linear_input)).mul(last_dim_norm(vit_grid(linear_gradient)))
    torch.testing.assert_close(token_map, expected)


def test_last_block_patch_tokens_without_gradient_are_refused(vit_problem):
    model, images, labels = vit_problem
    for method in (LayerNormGrad, LayerNormGradOrder1):
        with pytest.raises(RuntimeError, match=r"no gradient at any patch token.*ln_1"):
            method(model, model.encoder.layers[1]).attribute(images, target=labels)
    with pytest.raises(RuntimeError, match="encoder.ln.*ln_1"):
        LayerNormGrad(model, model.encoder.ln).attribute(images, target=labels)
    with NormGradMonitor(model, model.encoder.layers[1]) as monitor:
        with pytest.raises(RuntimeError, match="no gradient at any patch token"):
            F.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    assert monitor.latest is None


def test_a_list_of_layers_equals_one_layer_at_a_time(vit_problem):
    model, images, labels = vit_problem
    layers = [model.conv_proj, model.encoder.layers[0], model.encoder.layers[1].ln_1]
    for method, kwargs in [(LayerNormGrad, {}), (LayerNormGradOrder1, {"eps": 0.05})]:
        together = method(model, layers).attribute(images, target=labels, **kwargs)
        for layer, layer_map in zip(layers, together):
            alone = method(model, layer).attribute(images, target=labels, **kwargs)
            torch.testing.assert_close(layer_map, alone)


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_batch_invariance(vit_problem, swin_problem, which):
    model, images, labels = vit_problem if which == "vit" else swin_problem
    layer = model.encoder.layers[0] if which == "vit" else model.features[1]
    for method in (LayerNormGrad, LayerNormGradSelective, LayerNormGradOrder1):
        batch = method(model, layer).attribute(images, target=labels)
        alone = [
            method(model, layer).attribute(image, target=label)
            for image, label in zip(images.split(1), labels.split(1))
        ]
        torch.testing.assert_close(batch, torch.cat(alone))


def test_the_monitor_on_a_vit_gives_layer_normgrad_maps(vit_problem):
    model, images, labels = vit_problem
    layer = model.encoder.layers[0]
    expected = LayerNormGrad(model, layer).attribute(images, target=labels)
    with NormGradMonitor(model, layer) as monitor:
        F.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(monitor.latest.maps["encoder.layers.encoder_layer_0"], expected)


def test_a_user_transform_replaces_the_model_layout(vit_problem):
    """A transform given explicitly is used as given, e.g. to keep the class token out of a
    2 x 8 grid that the automatic choice would lay as 4 x 4."""
    model, images, labels = vit_problem
    layer = model.encoder.layers[0]
    maps = LayerNormGrad(model, layer, reshape_transform=TokensToGrid(1, (2, 8))).attribute(
        images, target=labels
    )
    activation, gradient = activation_and_gradient(model, layer, images, labels)
    expected = last_dim_norm(grid_of(activation, 1, 2, 8)) * last_dim_norm(
        grid_of(gradient, 1, 2, 8)
    )
    torch.testing.assert_close(maps, expected)


def test_layer_inputs_get_their_own_layout_across_a_permute(one_thread):
    """With attribute_to_layer_input, Swin's patch embedding sees the image (channels first) and
    its final Permute a channels-last input; ConvNeXt's two Permutes likewise, the other way."""
    swin, convnext = tiny_swin(), tiny_convnext()
    block = convnext.features[1][0].block
    cases = [
        (swin, swin.features[0], torch.randn(2, 3, 16, 24, dtype=torch.float64), False),
        (swin, swin.permute, torch.randn(2, 3, 16, 24, dtype=torch.float64), True),
        (convnext, block[1], torch.randn(2, 3, 32, 32, dtype=torch.float64), False),
        (convnext, block[6], torch.randn(2, 3, 32, 32, dtype=torch.float64), True),
    ]
    labels = torch.tensor([1, 3])
    captured = {}

    def leaf_input(module, args):
        captured["x"] = args[0].detach().requires_grad_()
        return (captured["x"],)

    for model, layer, images, channels_last in cases:
        handle = layer.register_forward_pre_hook(leaf_input)
        try:
            loss = F.cross_entropy(model(images), labels, reduction="sum")
            (gradient,) = torch.autograd.grad(loss, captured["x"])
        finally:
            handle.remove()
        activation = captured["x"].detach()
        if not channels_last:
            activation, gradient = activation.movedim(1, -1), gradient.movedim(1, -1)
        maps = LayerNormGrad(model, layer).attribute(
            images, target=labels, attribute_to_layer_input=True
        )
        torch.testing.assert_close(maps, last_dim_norm(activation) * last_dim_norm(gradient))
