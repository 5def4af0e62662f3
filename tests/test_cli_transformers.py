"""The command line on torchvision's transformers: default depths, Grad-CAM on the token grid, and
``explain --model vit_b_16 | swin_t | convnext_tiny`` end to end."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch
import torchvision
from captum.attr import LayerGradCam
from test_transformer_layouts import TokenModel
from test_transformers_trained import grad_cam_on_tokens
from transformer_models import tiny_vit

from captum_normgrad import data
from captum_normgrad.cli import main
from captum_normgrad.cli._gradcams import LayerGradCams
from captum_normgrad.cli._inputs import default_layer_names
from captum_normgrad.cli._models import LoadedModel


def _loaded(module: torch.nn.Module) -> LoadedModel:
    return LoadedModel("test", module, ["a"], (0.5,) * 3, (0.5,) * 3)


def test_default_depths_of_torchvision_transformers():
    vit = torchvision.models.VisionTransformer(
        32, 8, num_layers=6, num_heads=2, hidden_dim=8, mlp_dim=8
    )
    assert default_layer_names(_loaded(vit)) == [
        f"encoder.layers.encoder_layer_{index}.ln_1" for index in (0, 2, 3, 5)
    ]
    swin = torchvision.models.SwinTransformer([4, 4], 8, [1, 1, 1], [1, 1, 1], [2, 2])
    assert default_layer_names(_loaded(swin)) == ["features.1", "features.3", "features.5"]


def test_grad_cam_is_computed_on_the_token_grid_and_is_captums_elsewhere(one_thread):
    vit = tiny_vit()
    images, labels = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    layer = vit.encoder.layers[0]
    (cam,) = LayerGradCams(vit, [layer]).attribute(images, target=labels)
    torch.testing.assert_close(cam, grad_cam_on_tokens(vit, layer, images, labels))
    assert cam.shape == (2, 1, 4, 4)
    (cam,) = LayerGradCams(vit, [vit.conv_proj]).attribute(images, target=labels)
    captum = LayerGradCam(vit, vit.conv_proj).attribute(images, labels, relu_attributions=True)
    torch.testing.assert_close(cam, captum)
    model = TokenModel().double()
    with pytest.raises(ValueError, match="TokensToGrid"):
        LayerGradCams(model, [model.mlp]).attribute(
            torch.randn(2, 3, 4, 4, dtype=torch.float64), target=torch.tensor([0, 1])
        )


@pytest.fixture(scope="module")
def cat_png(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "cat.png"
    matplotlib.image.imsave(path, data.load_photo("chelsea").permute(1, 2, 0).numpy())
    return str(path)


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "convnext_tiny"])
def test_explain_a_torchvision_transformer(name, cat_png, tmp_path, capsys, one_thread):
    """Random weights, but a local state dict for ConvNeXt; ViT-B/16 needs its 224 pixels."""
    arguments = ["explain", "--image", cat_png, "--model", name, "--out", str(tmp_path)]
    arguments += ["--methods", "normgrad", "gradcam", "--repeats", "1"]
    if name == "vit_b_16":
        arguments += ["--layers", "encoder.layers.encoder_layer_11.ln_1"]
    else:
        arguments += ["--image-size", "64", "--num-classes", "10"]
    if name == "convnext_tiny":
        weights = tmp_path / "convnext.pt"
        torch.save(torchvision.models.convnext_tiny(num_classes=10).state_dict(), weights)
        arguments += ["--weights", str(weights)]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "NormGrad" in printed and "Grad-CAM" in printed
    assert (tmp_path / "explain_cat.png").stat().st_size > 0
