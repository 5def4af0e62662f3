"""The ``captum-normgrad`` command end to end on the bundled assets (answers to bad input:
tests/test_cli_errors.py; start-up, exit statuses and output folders: tests/test_cli_startup.py)."""

from __future__ import annotations

import csv
import subprocess
import sys
from importlib.metadata import entry_points

from captum_normgrad.cli import main

COMMAND = [sys.executable, "-m", "captum_normgrad"]


def _run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*COMMAND, *arguments], capture_output=True, text=True, timeout=300, check=False
    )


def test_console_script_is_main() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "captum-normgrad"]
    assert script.value == "captum_normgrad.cli:main"


def test_compare_end_to_end(tmp_path) -> None:
    result = _run(
        "compare", "--methods", "gradcam", "normgrad", "order1",
        "--layers", "_blocks.10", "_bn1", "--out", str(tmp_path), "--repeats", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "left 'tabby' (281), right 'espresso' (967)" in result.stdout
    table = result.stdout.splitlines()
    header = next(line for line in table if line.startswith("method"))
    # --repeats: the seconds are the median of warm calls, and the header says so (item 17).
    assert header.split() == ["method", "layer", "median_s", "pointing", "selectivity"]
    assert "median_s: median seconds of 1 warm call(s)" in result.stdout
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
