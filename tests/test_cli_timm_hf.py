"""``--model timm:NAME`` and ``--model hf:PATH``: tiny models built here, nothing downloaded.

timm's ``test_vit`` (0.3 M parameters, configured for 160 px) and a two-block Hugging Face ViT saved
with ``save_pretrained`` stand in for real checkpoints. Token layers wait for their layouts
(issue 21 item 1); the end-to-end runs explain the patch embedding's convolution, which has a map
today, and the default depths are checked by name.
"""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from cli_fixtures import save_hugging_face_vit

from captum_normgrad.cli import main
from captum_normgrad.cli._inputs import default_layer_names
from captum_normgrad.cli._models import load_model

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

HF_PATCHES = "vit.embeddings.patch_embeddings.projection"


def _error_of(capsys, arguments: list[str]) -> str:
    status = main(arguments)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 1, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("captum-normgrad: error: ")
    return lines[0]


@pytest.fixture
def explain(tmp_path, cat_png):
    return ["explain", "--image", cat_png, "--out", str(tmp_path / "out"), "--dpi", "30"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The loader sets HF_HUB_OFFLINE only where unset: set here, it is restored after each test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory) -> str:
    """A checkpoint as timm's train.py writes it: the state dict beside the arguments and epoch."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=3)
    path = tmp_path_factory.mktemp("timm") / "checkpoint.pth.tar"
    arguments = argparse.Namespace(model="test_vit", lr=0.1)
    torch.save(
        {"epoch": 3, "arch": "test_vit", "state_dict": model.state_dict(), "args": arguments}, path
    )
    return str(path)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    """A two-block ViT for 32 px images with random weights, saved as a user's fine-tuned one."""
    labels = {0: "cat, tabby", 1: "dog", 2: "cup"}
    return str(save_hugging_face_vit(tmp_path_factory.mktemp("hf") / "tiny-vit", labels))


def test_explain_a_timm_model_from_a_timm_checkpoint(explain, timm_checkpoint, capsys, one_thread):
    arguments = [*explain, "--model", "timm:test_vit", "--weights", timm_checkpoint]
    arguments += ["--num-classes", "3", "--layers", "patch_embed.proj"]
    assert main([*arguments, "--methods", "normgrad", "gradcam"]) == 0
    printed = capsys.readouterr().out
    assert "explaining class 'class " in printed and "figure:" in printed


def test_explain_a_hugging_face_folder(explain, hf_folder, capsys, one_thread):
    # The labels come from the config (first name of each); ModelOutput's logits are explained.
    arguments = [*explain, "--model", f"hf:{hf_folder}", "--layers", HF_PATCHES, "--target", "cat"]
    assert main([*arguments, "--methods", "normgrad", "gradcam"]) == 0
    printed = capsys.readouterr().out
    assert "explaining class 'cat' (0)" in printed and "figure:" in printed


def test_configured_image_sizes_and_default_depths(hf_folder):
    vit = load_model("timm:test_vit", num_classes=3)
    assert vit.image_size == 160  # pretrained_cfg["input_size"], read without weights
    assert default_layer_names(vit) == [f"blocks.{index}.norm1" for index in (0, 2, 3, 5)]
    cnn = load_model("timm:test_resnet", num_classes=3)
    convs = [name for name, m in cnn.module.named_modules() if isinstance(m, torch.nn.Conv2d)]
    picked = default_layer_names(cnn)  # a timm CNN: four convolutions, as for torchvision's
    assert len(picked) == 4 and (picked[0], picked[-1]) == (convs[0], convs[-1])
    hf = load_model(f"hf:{hf_folder}")
    assert (hf.image_size, hf.class_names) == (32, ["cat", "dog", "cup"])
    blocks = [name for name, _ in hf.module.named_modules() if name.endswith("layernorm_before")]
    assert default_layer_names(hf) == blocks and len(blocks) == 2


def test_a_default_token_layer_is_explained_or_refused_in_one_line(
    explain, hf_folder, capsys, one_thread
):
    # Before the token layouts land the library refuses the layer by name; after, it has a map.
    status = main([*explain, "--model", f"hf:{hf_folder}", "--methods", "normgrad"])
    captured = capsys.readouterr()
    if status == 1:
        (line,) = captured.err.splitlines()
        assert "layer 'vit." in line and "layernorm_before" in line
    else:
        assert status == 0 and "figure:" in captured.out


def test_timm_weights_that_do_not_fit(capsys, explain, timm_checkpoint, squeezenet_weights):
    arguments = [*explain, "--model", "timm:test_vit", "--weights"]
    message = _error_of(capsys, [*arguments, timm_checkpoint])
    assert "are for timm:test_vit with 3 classes: pass --num-classes 3" in message
    message = _error_of(capsys, [*arguments, squeezenet_weights])
    assert "are not for the architecture timm:test_vit" in message
    assert "--num-classes" not in message


def test_unknown_timm_name_lists_close_names(capsys, explain):
    message = _error_of(capsys, [*explain, "--model", "timm:resnet10"])
    assert "unknown timm model 'resnet10'" in message and "resnet10t" in message


def test_an_image_size_the_model_refuses_is_one_line(capsys, explain, hf_folder):
    # timm asserts its input size (an AssertionError, once a traceback); Hugging Face raises.
    message = _error_of(capsys, [*explain, "--model", "timm:test_vit3", "--image-size", "96"])
    assert "timm:test_vit3 cannot run on this input" in message
    message = _error_of(capsys, [*explain, "--model", f"hf:{hf_folder}", "--image-size", "64"])
    assert "cannot run on this input" in message and "(32*32)" in message


def test_hugging_face_folders_are_checked_before_loading(
    capsys, explain, tmp_path, hf_folder, monkeypatch
):
    monkeypatch.setitem(sys.modules, "transformers", None)  # never reached
    message = _error_of(capsys, [*explain, "--model", f"hf:{tmp_path / 'missing'}"])
    assert "no such folder" in message
    message = _error_of(capsys, [*explain, "--model", f"hf:{tmp_path}"])
    assert "holds no config.json" in message and "save_pretrained" in message
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _error_of(capsys, [*explain, "--model", f"hf:{hf_folder}", "--num-classes", "5"])
    assert "has 3 classes (its config's); drop --num-classes" in message
    message = _error_of(capsys, [*explain, "--model", f"hf:{hf_folder}", "--weights", "w.pt"])
    assert "drop --weights" in message


@pytest.mark.parametrize(
    ("package", "model", "extra"),
    [("timm", "timm:test_vit", "timm"), ("transformers", "hf:FOLDER", "huggingface")],
)
def test_a_missing_extra_is_named(capsys, explain, hf_folder, monkeypatch, package, model, extra):
    monkeypatch.setitem(sys.modules, package, None)
    message = _error_of(capsys, [*explain, "--model", model.replace("FOLDER", hf_folder)])
    assert f"needs the package '{package}', which is not installed" in message
    assert f'pip install "captum-normgrad[{extra}]"' in message
