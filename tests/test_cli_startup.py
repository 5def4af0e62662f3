"""The command line before any computation: start-up speed (no torch), exit statuses, ``--version``,
``python -m captum_normgrad``, and output folders refused before the model is loaded (issue 9 items
13 and 16). Every process here ends before torch would be imported, so each takes a fraction of a
second."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from captum_normgrad import __version__

MODULE = [sys.executable, "-m", "captum_normgrad"]


def _run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MODULE, *arguments], capture_output=True, text=True, timeout=120, check=False
    )


def test_help_version_and_usage_errors_never_import_torch() -> None:
    # One process: each answer, its exit status, and torch still absent from sys.modules.
    script = """
import contextlib, io, sys
from captum_normgrad.cli import main
statuses = []
for argv in (["--help"], ["explain", "--help"], ["--version"], ["compare", "--methods", "magic"],
             ["evaluate", "--steps", "0"], ["compare", "--left", "dog"], ["explain"], [],
             ["explain", "--model", "timm:resnet18"], ["explain", "--model", "hf:nowhere"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        statuses.append(main(argv))
heavy = sorted(m for m in ("torch", "torchvision", "captum", "matplotlib", "numpy", "timm",
                           "transformers") if m in sys.modules)
print(statuses, heavy)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    # --help and --version: 0; every usage error: 1, as the README promises for bad input.
    assert result.stdout.split() == [
        "[0,", "0,", "0,", "1,", "1,", "1,", "1,", "1,", "1,", "1]", "[]"
    ]  # fmt: skip


def test_python_dash_m_answers_version_and_usage_errors_with_their_status() -> None:
    version = _run("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"captum-normgrad {__version__}")
    wrong = _run("evaluate", "--steps", "0")
    assert wrong.returncode == 1
    assert wrong.stderr.splitlines()[-1] == (
        "captum-normgrad evaluate: error: argument --steps: 0 is not a positive integer"
    )
    missing = _run("explain")
    assert missing.returncode == 1 and "--image" in missing.stderr


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no file can be written in: mode 0o500, or for root (who ignores modes) a path in
    sysfs, where even root cannot create entries."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o500)
        yield str(folder / "out"), "cannot write to --out"
        folder.chmod(0o700)
    else:
        yield "/sys/captum_normgrad_out", "cannot write to --out"


def test_unwritable_output_folders_are_refused_before_any_computation(
    tmp_path, read_only_folder
) -> None:
    regular_file = tmp_path / "notes.txt"
    regular_file.write_text("a file, not a folder")
    image = tmp_path / "cat.png"  # never read: the output folder is checked first
    read_only, reason = read_only_folder
    cases = [
        (["compare", "--out", str(regular_file / "out")], "is a file, not a folder"),
        (["compare", "--out", str(regular_file)], "is an existing file, not a folder"),
        (["compare", "--out", read_only], reason),
        (["explain", "--image", str(image), "--out", str(regular_file)], "existing file"),
        (["evaluate", "--out", str(regular_file / "deeper" / "out")], "is a file, not a folder"),
    ]
    for arguments, expected in cases:
        result = _run(*arguments)
        assert result.returncode == 1, (arguments, result.stderr)
        (line,) = result.stderr.splitlines()
        assert line.startswith("captum-normgrad: error: ") and "--out" in line, line
        assert expected in line, line
        assert result.stdout == ""
