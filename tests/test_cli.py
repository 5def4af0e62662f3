"""The ``captum-normgrad`` command end to end on the bundled assets, and its answers to bad input."""

from __future__ import annotations

import csv
import subprocess
import sys
from importlib.metadata import entry_points

import matplotlib.image
import pytest
import torch
import torchvision

from captum_normgrad import data
from captum_normgrad.cli import main

COMMAND = [sys.executable, "-m", "captum_normgrad"]


def _run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*COMMAND, *arguments], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def cat_png(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "cat.png"
    matplotlib.image.imsave(path, data.load_photo("chelsea").permute(1, 2, 0).numpy())
    return str(path)


@pytest.fixture(scope="module")
def squeezenet_weights(tmp_path_factory) -> str:
    """A 10-class SqueezeNet state dict: fits ``--num-classes 10``, not the 1000-class default."""
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(weights=None, num_classes=10)
    path = tmp_path_factory.mktemp("weights") / "squeezenet10.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def test_console_script_is_main() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "captum-normgrad"]
    assert script.value == "captum_normgrad.cli:main"


def test_compare_end_to_end(tmp_path) -> None:
    result = _run(
        "compare", "--methods", "gradcam", "normgrad", "order1",
        "--layers", "_blocks.10", "_bn1", "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "left 'tabby' (281), right 'espresso' (967)" in result.stdout
    table = result.stdout.splitlines()
    header = next(line for line in table if line.startswith("method"))
    assert header.split() == ["method", "layer", "seconds", "pointing", "selectivity"]
    rows = [line.split() for line in table if line.split()[:1] in (["Grad-CAM"], ["NormGrad"])]
    rows += [line.split()[1:] for line in table if line.startswith("order 1")]
    assert len(rows) == 6
    for row in rows:
        assert row[-2] in ("0/2", "1/2", "2/2") and -1 <= float(row[-1]) <= 1
    figure = tmp_path / "compare.png"
    assert figure.stat().st_size > 50_000


def test_explain_end_to_end(tmp_path, cat_png) -> None:
    result = _run(
        "explain", "--image", cat_png, "--target", "tabby", "--layers", "_blocks.4", "_bn1",
        "--methods", "normgrad", "selective", "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "explaining class 'tabby' (281)" in result.stdout
    top = result.stdout.split("top predictions", 1)[1].splitlines()[0]
    assert any(f"({index})" in top for index in range(281, 286))  # a cat class in the top 5
    assert (tmp_path / "explain_cat.png").stat().st_size > 20_000


def test_evaluate_end_to_end(tmp_path) -> None:
    result = _run(
        "evaluate", "--methods", "gradcam", "normgrad", "--layers", "_bn1", "--steps", "2",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "evaluate.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["method"], row["layer"]) for row in rows] == [
        ("Grad-CAM", "_bn1"),
        ("NormGrad", "_bn1"),
    ]
    for row in rows:
        assert 0 <= float(row["deletion_auc"]) <= 1 and 0 <= float(row["insertion_auc"]) <= 1
        # six examples (two halves of three composites): a multiple of 1/6 up to rounding
        assert round(float(row["pointing_game"]) * 6, 6) in range(7)
        assert -1 <= float(row["selectivity"]) <= 1
    assert (tmp_path / "evaluate_curves.png").stat().st_size > 10_000
    assert "evaluating" in result.stderr  # the progress bar


def test_explain_a_torchvision_model_with_local_weights(tmp_path, cat_png, squeezenet_weights):
    status = main(
        [
            "explain", "--image", cat_png, "--model", "squeezenet1_1",
            "--weights", squeezenet_weights, "--num-classes", "10", "--target", "3",
            "--layers", "features.3", "--methods", "normgrad", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert status == 0
    assert (tmp_path / "explain_cat.png").exists()


def test_bad_input_in_a_real_process_is_one_line_and_status_1(tmp_path) -> None:
    result = _run("explain", "--image", str(tmp_path / "missing.jpg"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"captum-normgrad: error: image not found: {tmp_path / 'missing.jpg'}"
    ]


def _error_of(capsys, arguments: list[str]) -> str:
    status = main(arguments)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 1, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("captum-normgrad: error: ")
    return lines[0]


def test_unreadable_image(capsys, tmp_path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    assert "cannot read" in _error_of(capsys, ["explain", "--image", str(fake)])


def test_a_folder_is_not_an_image(capsys, tmp_path) -> None:
    assert "not a file" in _error_of(capsys, ["explain", "--image", str(tmp_path)])


def test_unknown_layer_lists_valid_names(capsys, cat_png) -> None:
    message = _error_of(capsys, ["explain", "--image", cat_png, "--layers", "_block.10"])
    assert "unknown layer '_block.10'" in message
    assert "did you mean _blocks.10" in message
    assert "_conv_stem" in message and "_bn1" in message


@pytest.mark.parametrize(("target", "expected"), [("1000", "out of range"), ("-1", "out of range")])
def test_class_index_out_of_range(capsys, cat_png, target, expected) -> None:
    message = _error_of(capsys, ["explain", "--image", cat_png, "--target", target])
    assert expected in message and "1000 classes (0..999)" in message


def test_unknown_class_name_suggests(capsys, cat_png) -> None:
    message = _error_of(capsys, ["explain", "--image", cat_png, "--target", "tabbby"])
    assert "unknown class name 'tabbby'" in message and "'tabby'" in message


def test_weights_that_do_not_fit(capsys, cat_png, squeezenet_weights) -> None:
    arguments = ["explain", "--image", cat_png, "--model", "squeezenet1_1"]
    message = _error_of(capsys, [*arguments, "--weights", squeezenet_weights])
    assert "do not fit the architecture squeezenet1_1" in message
    assert "classifier.1.weight (10, 512, 1, 1) vs (1000, 512, 1, 1)" in message


def test_weights_file_that_is_not_a_checkpoint(capsys, cat_png, tmp_path) -> None:
    garbage = tmp_path / "weights.pt"
    garbage.write_bytes(b"\x00garbage")
    arguments = ["explain", "--image", cat_png, "--model", "squeezenet1_1"]
    assert "cannot read weights file" in _error_of(capsys, [*arguments, "--weights", str(garbage)])


def test_pickled_objects_are_refused(capsys, cat_png, tmp_path) -> None:
    # weights_only=True: a checkpoint that would run arbitrary code on load is not loaded.
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"weight": torch.zeros(1), "callback": print}, unsafe)
    arguments = ["explain", "--image", cat_png, "--model", "squeezenet1_1"]
    assert "cannot read weights file" in _error_of(capsys, [*arguments, "--weights", str(unsafe)])


def test_unknown_model(capsys, cat_png) -> None:
    message = _error_of(capsys, ["explain", "--image", cat_png, "--model", "resnet181"])
    assert "unknown model 'resnet181'" in message and "resnet18" in message


def test_a_layer_that_runs_many_times_is_explained(capsys, cat_png) -> None:
    # EfficientNet's `_swish` module is shared by every block: NormGrad refuses it by name.
    message = _error_of(capsys, ["explain", "--image", cat_png, "--layers", "_swish"])
    assert "method 'gradcam'" in message or "method 'normgrad'" in message


def test_usage_errors_exit_with_2(capsys) -> None:
    assert main(["compare", "--methods", "magic"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["evaluate", "--steps", "0"]) == 2
    assert "--steps: 0 is not a positive integer" in capsys.readouterr().err
    assert main(["compare", "--left", "dog"]) == 2
    assert "chelsea" in capsys.readouterr().err
    assert main([]) == 2


def test_help_exits_with_0(capsys) -> None:
    assert main(["--help"]) == 0
    assert "compare" in capsys.readouterr().out


def test_a_missing_extra_is_one_line(capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    message = _error_of(capsys, ["compare"])
    assert "efficientnet-lite-pytorch" in message and "captum-normgrad[examples]" in message
