"""timm and Hugging Face models laid out from their architecture, with no reshape_transform: every
family's map equals a float64 map computed here by hand (prefix tokens dropped, tokens on their
grid, norms over channels) at order 0 and order 1; a size coincidence (H == W == C) is laid out by
the architecture; an unknown token model whose shape leaves the channels open is refused."""

from __future__ import annotations

import pytest
import torch
from model_state import assert_model_unchanged, model_snapshot
from torch import nn
from transformer_models import activation_and_gradient, grid_of, last_dim_norm, order1_reference

from captum_normgrad import (
    LayerNormGrad,
    LayerNormGradAdversarial,
    LayerNormGradConv,
    LayerNormGradOrder1,
    LayerNormGradSelective,
)
from captum_normgrad.training import NormGradMonitor

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from timm.models.convnext import ConvNeXt  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.eva import Eva  # noqa: E402
from timm.models.swin_transformer import SwinTransformer  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
HF_VIT = dict(
    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2
)


class Logits(nn.Module):
    """The hand-made reference reads logits; the library is given the model itself."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images):
        outputs = self.model(images)
        return outputs if isinstance(outputs, torch.Tensor) else outputs.logits


def tokens(prefix, height, width):
    return lambda t: grid_of(t, prefix, height, width)


def nhwc(t):
    return t


def nchw(t):
    return t.movedim(1, -1)


def _hf(config_class, model_class, **config):
    torch.manual_seed(0)
    return model_class(config_class(num_labels=5, **config))


def _hf_blocks(model):
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", base)
    return getattr(encoder, "layers", None) or getattr(encoder, "layer", None)


def _families():
    """(id, model, layer getter, (N, *S, C) of the activation, image size)."""
    t = transformers
    torch.manual_seed(0)
    return [
        ("timm-vit", VisionTransformer(img_size=32, **VIT), lambda m: m.blocks[0],
         tokens(1, 4, 4), (32, 32)),
        ("timm-vit-registers-nonsquare", VisionTransformer(img_size=(32, 48), reg_tokens=2, **VIT),
         lambda m: m.blocks[0], tokens(3, 4, 6), (32, 48)),
        ("timm-vit-no-class-token",
         VisionTransformer(img_size=32, class_token=False, global_pool="avg", **VIT),
         lambda m: m.blocks[1], tokens(0, 4, 4), (32, 32)),
        ("timm-deit-distilled", VisionTransformerDistilled(img_size=32, **VIT),
         lambda m: m.blocks[0].norm1, tokens(2, 4, 4), (32, 32)),
        # Run at another size with the configured count of patches (2 x 8 and 4 x 4 hold 16): only
        # the grid of the call tells them apart.
        ("timm-vit-dynamic-blocks", VisionTransformer(img_size=32, dynamic_img_size=True, **VIT),
         lambda m: m.blocks[0], tokens(1, 2, 8), (16, 64)),
        ("timm-vit-dynamic-patch-embed",
         VisionTransformer(img_size=32, dynamic_img_size=True, **VIT),
         lambda m: m.patch_embed, nhwc, (16, 64)),
        ("timm-swin-dynamic-mlp", SwinTransformer(img_size=32, patch_size=4, window_size=2,
         embed_dim=16, depths=(1, 1), num_heads=(2, 2), num_classes=5, strict_img_size=False,
         dynamic_img_size=True), lambda m: m.layers[1].blocks[0].mlp, tokens(0, 2, 8), (16, 64)),
        ("timm-eva", Eva(img_size=32, **VIT), lambda m: m.blocks[0], tokens(1, 4, 4), (32, 32)),
        ("timm-swin-stage", SwinTransformer(img_size=32, patch_size=4, window_size=2,
         embed_dim=16, depths=(1, 1), num_heads=(2, 2), num_classes=5),
         lambda m: m.layers[1], nhwc, (32, 32)),
        ("timm-swin-mlp", SwinTransformer(img_size=32, patch_size=4, window_size=2,
         embed_dim=16, depths=(1, 1), num_heads=(2, 2), num_classes=5),
         lambda m: m.layers[1].blocks[0].mlp, tokens(0, 4, 4), (32, 32)),
        ("timm-convnext-block-inside", ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16),
         num_classes=5), lambda m: m.stages[1].blocks[0].norm, nhwc, (32, 32)),
        ("timm-convnext-stage", ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16),
         num_classes=5), lambda m: m.stages[1], nchw, (32, 32)),
        ("hf-vit", _hf(t.ViTConfig, t.ViTForImageClassification, intermediate_size=64, **HF_VIT),
         lambda m: _hf_blocks(m)[0], tokens(1, 4, 4), (32, 32)),
        ("hf-vit-model-layernorm",
         _hf(t.ViTConfig, t.ViTForImageClassification, intermediate_size=64, **HF_VIT),
         lambda m: _hf_blocks(m)[0].layernorm_after, tokens(1, 4, 4), (32, 32)),
        ("hf-deit-teacher", _hf(t.DeiTConfig, t.DeiTForImageClassificationWithTeacher,
         intermediate_size=64, **HF_VIT), lambda m: _hf_blocks(m)[0], tokens(2, 4, 4), (32, 32)),
        ("hf-dinov2", _hf(t.Dinov2Config, t.Dinov2ForImageClassification, mlp_ratio=2, **HF_VIT),
         lambda m: _hf_blocks(m)[0], tokens(1, 4, 4), (32, 32)),
        ("hf-dinov2-other-size", _hf(t.Dinov2Config, t.Dinov2ForImageClassification,
         mlp_ratio=2, **HF_VIT), lambda m: _hf_blocks(m)[1], tokens(1, 2, 8), (16, 64)),
        ("hf-dinov2-registers", _hf(t.Dinov2WithRegistersConfig,
         t.Dinov2WithRegistersForImageClassification, mlp_ratio=2, num_register_tokens=2,
         **HF_VIT), lambda m: _hf_blocks(m)[0], tokens(3, 4, 4), (32, 32)),
        ("hf-swin-block-norm", _hf(t.SwinConfig, t.SwinForImageClassification, image_size=32,
         patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2),
         lambda m: m.swin.encoder.layers[1].blocks[0].layernorm_after, tokens(0, 4, 4), (32, 32)),
        ("hf-swin-run-time-grid", _hf(t.SwinConfig, t.SwinForImageClassification, image_size=32,
         patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2),
         lambda m: m.swin.layernorm, tokens(0, 2, 8), (16, 64)),
        # Blocks returning tuples (hidden states first): an attention, Swin's embeddings, a
        # block, a stage with its patch merging (8 x 8 tokens merged to 4 x 4)
        ("hf-vit-attention",
         _hf(t.ViTConfig, t.ViTForImageClassification, intermediate_size=64, **HF_VIT),
         lambda m: _hf_blocks(m)[0].attention, tokens(1, 4, 4), (32, 32)),
        ("hf-swin-embeddings", _hf(t.SwinConfig, t.SwinForImageClassification, image_size=32,
         patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2),
         lambda m: m.swin.embeddings, tokens(0, 8, 8), (32, 32)),
        ("hf-swin-block", _hf(t.SwinConfig, t.SwinForImageClassification, image_size=32,
         patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2),
         lambda m: m.swin.encoder.layers[1].blocks[0], tokens(0, 4, 4), (32, 32)),
        ("hf-swin-stage-merging", _hf(t.SwinConfig, t.SwinForImageClassification, image_size=32,
         patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2),
         lambda m: m.swin.encoder.layers[0], tokens(0, 2, 8), (16, 64)),
        ("hf-convnext-inside", _hf(t.ConvNextConfig, t.ConvNextForImageClassification,
         hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
         lambda m: m.convnext.encoder.stages[1].layers[0].pwconv2, nhwc, (32, 32)),
        ("hf-convnext-stage", _hf(t.ConvNextConfig, t.ConvNextForImageClassification,
         hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
         lambda m: m.convnext.encoder.stages[1], nchw, (32, 32)),
    ]  # fmt: skip


FAMILIES = _families()


@pytest.fixture(params=FAMILIES, ids=[family[0] for family in FAMILIES])
def family(request, one_thread):
    _, model, get_layer, to_channels_last, size = request.param
    model = model.double().eval()
    for name, parameter in model.named_parameters():
        if name.endswith("mask_token"):  # DINOv2's, unused without a mask: the reference needs
            parameter.requires_grad_(False)  # every parameter it differentiates to be used
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    return model, get_layer(model), to_channels_last, images, torch.tensor([1, 3])


def test_order0_equals_the_hand_made_map(family):
    model, layer, to_channels_last, images, labels = family
    maps = LayerNormGrad(model, layer).attribute(images, target=labels)
    activation, gradient = activation_and_gradient(Logits(model), layer, images, labels)
    expected = last_dim_norm(to_channels_last(activation)) * last_dim_norm(
        to_channels_last(gradient)
    )
    assert maps.shape == expected.shape
    torch.testing.assert_close(maps, expected)
    assert expected.abs().max() > 0


def test_order1_equals_the_hand_made_map(family):
    model, layer, to_channels_last, images, labels = family
    eps = 1e-3
    maps = LayerNormGradOrder1(model, layer).attribute(
        images, target=labels, eps=eps, batch_mode="loop"
    )
    expected = order1_reference(Logits(model), layer, images, labels, to_channels_last, eps, 0.5)
    torch.testing.assert_close(maps, expected)


def test_swin_stage_whose_height_width_and_channels_coincide_is_laid_out_by_the_architecture(
    one_thread,
):
    """timm Swin at 32 px, patch 4, embed_dim 8: stage 0 is (N, 8, 8, 8), as swin_tiny's stage 0 is
    (N, 96, 96, 96) at 384 px. Norms over the channels (last), not over H."""
    torch.manual_seed(0)
    model = SwinTransformer(
        img_size=32, patch_size=4, window_size=2, embed_dim=8, depths=(1, 1), num_heads=(2, 2),
        num_classes=5,
    ).double().eval()  # fmt: skip
    images, labels = torch.randn(1, 3, 32, 32, dtype=torch.float64), torch.tensor([2])
    layer = model.layers[0]
    activation, gradient = activation_and_gradient(model, layer, images, labels)
    assert activation.shape == (1, 8, 8, 8)
    maps = LayerNormGrad(model, layer).attribute(images, target=labels)
    torch.testing.assert_close(maps, last_dim_norm(activation) * last_dim_norm(gradient))
    over_height = activation.norm(dim=1, keepdim=True) * gradient.norm(dim=1, keepdim=True)
    assert not torch.allclose(maps, over_height)


def test_window_attention_inside_swin_is_refused_naming_the_layer(one_thread):
    model = SwinTransformer(
        img_size=32, patch_size=4, window_size=2, embed_dim=8, depths=(1, 1), num_heads=(2, 2),
        num_classes=5,
    ).double().eval()  # fmt: skip
    with pytest.raises(ValueError, match=r"layers.0.blocks.0.attn' .*per window"):
        LayerNormGrad(model, model.layers[0].blocks[0].attn).attribute(
            torch.randn(1, 3, 32, 32, dtype=torch.float64), target=0
        )


class Mixer(nn.Module):
    """An unknown token model: its block multiplies tokens by a learnt (T, T) matrix in a custom
    module with no child that says where the channels are: (N, 8, 8) could be either."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.mix = TokenMix()
        self.head = nn.Linear(8, 3)

    def forward(self, pixels):  # (N, 3, 8 tokens as a 2 x 4 image)
        return self.head(self.mix(self.embed(pixels.flatten(2).transpose(1, 2))).mean(dim=1))


class TokenMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, tokens):
        return torch.einsum("st,ntc->nsc", self.weight, tokens)


def test_unknown_token_model_with_an_ambiguous_shape_is_refused_naming_the_layer(one_thread):
    model = Mixer().double()
    pixels = torch.randn(2, 3, 2, 4, dtype=torch.float64)
    for method in (LayerNormGrad, LayerNormGradOrder1):
        with pytest.raises(
            ValueError, match=r"layer 'mix' has an activation of shape \([12], 8, 8\).*TokensToGrid"
        ):
            method(model, model.mix).attribute(pixels, target=[0, 1])


@pytest.mark.parametrize(
    ("method", "options"),
    [
        (LayerNormGrad, {}),
        (LayerNormGradSelective, {}),
        (LayerNormGradConv, {}),
        (LayerNormGradOrder1, {"batch_mode": "loop"}),
        (LayerNormGradOrder1, {"batch_mode": "vmap"}),
        (LayerNormGradAdversarial, {"batch_mode": "loop"}),
    ],
    ids=["order0", "selective", "conv", "order1-loop", "order1-vmap", "adversarial"],
)
def test_every_method_reads_the_grid_of_the_call_and_leaves_no_hook(method, options, one_thread):
    """A 16 x 64 image on a ViT configured for 32 x 32 makes 16 patch tokens, as a 32 x 32 one
    does: every method lays them on the 2 x 8 grid of the call, and its grid hooks are gone after
    the call; the next call, at the configured size, gets the 4 x 4 grid."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, dynamic_img_size=True, **VIT).double().eval()
    layer = model.blocks[0].mlp.fc2  # a Linear, for LayerNormGradConv too
    before = model_snapshot(model)
    explainer = method(model, layer)
    for size, grid in (((16, 64), (2, 8)), ((32, 32), (4, 4))):
        images = torch.randn(2, 3, *size, dtype=torch.float64)
        maps = explainer.attribute(images, target=[1, 3], **options)
        assert maps.shape == (2, 1, *grid)
        assert torch.isfinite(maps).all() and maps.abs().max() > 0
    assert_model_unchanged(model, before)


def test_the_monitor_lays_out_each_step_on_its_own_grid(one_thread):
    """Training steps at two sizes with the same token count: each map on its step's grid."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, dynamic_img_size=True, **VIT).double().eval()
    layer = model.blocks[0]
    batches = [torch.randn(2, 3, *size, dtype=torch.float64) for size in ((16, 64), (32, 32))]
    labels = torch.tensor([0, 4])
    expected = [LayerNormGrad(model, layer).attribute(x, target=labels) for x in batches]
    with NormGradMonitor(model, layer, history=2) as monitor:
        for images in batches:
            nn.functional.cross_entropy(model(images), labels).backward()
            model.zero_grad(set_to_none=True)
    maps = [next(iter(step.maps.values())) for step in monitor.history]
    assert [m.shape for m in maps] == [(2, 1, 2, 8), (2, 1, 4, 4)]
    torch.testing.assert_close(maps, expected)


def test_the_monitor_lays_out_timm_and_hugging_face_layers_as_the_methods(one_thread):
    """The training monitor resolves the same layouts: its map from the step's own backward
    equals LayerNormGrad's."""
    problems = [
        family
        for family in FAMILIES
        if family[0] in ("timm-swin-mlp", "hf-dinov2-registers", "hf-swin-block")
    ]
    for _, model, get_layer, _, size in problems:
        model, layer = model.double().eval(), get_layer(model)
        images, labels = torch.randn(2, 3, *size, dtype=torch.float64), torch.tensor([0, 4])
        expected = LayerNormGrad(model, layer).attribute(images, target=labels)
        with NormGradMonitor(model, layer) as monitor:
            nn.functional.cross_entropy(Logits(model)(images), labels).backward()
        model.zero_grad(set_to_none=True)
        (maps,) = monitor.latest.maps.values()
        torch.testing.assert_close(maps, expected)
