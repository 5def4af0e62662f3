"""``captum-normgrad evaluate --data``: one process and ``torchrun -m captum_normgrad`` agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from evaluation_datasets import write_voc

from captum_normgrad.cli import main


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny VOC folder and the arguments of a small run on it (a 20-class SqueezeNet)."""
    folder = tmp_path_factory.mktemp("cli")
    write_voc(folder / "voc")
    torch.manual_seed(0)
    weights = folder / "squeezenet20.pt"
    torch.save(torchvision.models.squeezenet1_1(weights=None, num_classes=20).state_dict(), weights)
    arguments = [
        "evaluate", "--data", f"voc:{folder / 'voc'}", "--model", "squeezenet1_1",
        "--weights", str(weights), "--num-classes", "20", "--methods", "normgrad", "gradcam",
        "--layers", "features.3", "features.12", "--metrics", "pointing_game", "deletion",
        "--steps", "2", "--image-size", "32", "--threads", "1",
    ]  # fmt: skip
    return folder, arguments


def _csv_files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("per_example.csv", "summary.csv")}


def test_torchrun_module_run_writes_what_one_process_writes(voc_run, capsys, one_thread):
    folder, arguments = voc_run
    assert main([*arguments, "--out", str(folder / "one")]) == 0
    printed = capsys.readouterr().out
    assert "per example:" in printed and "NormGrad  features.3" in printed
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "-m", "captum_normgrad", *arguments, "--out", str(folder / "two")]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert _csv_files(folder / "two") == _csv_files(folder / "one")
    assert (folder / "two" / "curves.png").exists()


def test_a_limited_run_continues_to_the_same_files(voc_run, one_thread, capsys):
    folder, arguments = voc_run
    assert main([*arguments, "--out", str(folder / "whole")]) == 0
    assert main([*arguments, "--limit", "2", "--out", str(folder / "resumed")]) == 0
    assert main([*arguments, "--out", str(folder / "resumed")]) == 0
    assert _csv_files(folder / "resumed") == _csv_files(folder / "whole")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--metrics", "pointing_game"], "--metrics apply to a data set: add --data"),
        (["--data", "pascal:x"], "KIND one of voc, coco, folder"),
        (["--data", "voc:/nonexistent"], "does not exist"),
    ],
)
def test_bad_data_arguments_are_one_line(arguments, message, capsys, tmp_path):
    assert main(["evaluate", *arguments, "--out", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
