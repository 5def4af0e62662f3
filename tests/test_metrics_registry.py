"""One registry of metric names (``captum_normgrad._core.metric_names``) for both runners and the CLI.

``evaluate_attributions`` (batches from a loader) and ``evaluate_dataset`` (a data set on disk)
accept exactly the registry's names, fill exactly its columns, and refuse anything else with the
same message; ``evaluate --metrics`` offers the same names without importing torch.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys

import pytest
import torch
from evaluation_datasets import voc_classifier, write_voc

from captum_normgrad import LayerNormGrad
from captum_normgrad._core.metric_names import (
    CURVE_COLUMNS,
    LOWER_IS_BETTER,
    METRICS,
    check_metric_names,
)
from captum_normgrad.cli import evaluate as evaluate_command
from captum_normgrad.evaluation import Preprocessing, VOCDataset, evaluate_dataset
from captum_normgrad.metrics import evaluate_attributions

ALL_COLUMNS = [column for metric in METRICS.values() for column in metric.columns]
KEYS = ["method", "layer", "examples"]


def _loader_run(metrics):
    model = voc_classifier()
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16)
    boxes = [torch.tensor([[2, 2, 9, 9]]), torch.tensor([[0, 4, 16, 12]]), None]
    loader = [(images, torch.tensor([0, 5, 7]), boxes)]
    methods = {"NormGrad": LayerNormGrad(model, model[2])}
    return evaluate_attributions(model, methods, loader, metrics, n_steps=3, progress=False)


def _dataset_run(tmp_path, metrics):
    model = voc_classifier()
    methods = {"NormGrad": LayerNormGrad(model, model[2])}
    return evaluate_dataset(
        model, VOCDataset(write_voc(tmp_path / "voc")), methods, tmp_path / "out", metrics,
        preprocessing=Preprocessing(resize=16), n_steps=3, num_threads=1, limit=2, progress=False,
    )  # fmt: skip


def test_both_runners_accept_every_registered_name_and_fill_its_columns(tmp_path, one_thread):
    loader_table = _loader_run(list(METRICS))
    dataset_table = _dataset_run(tmp_path, list(METRICS))
    assert loader_table.columns == dataset_table.columns == KEYS + ALL_COLUMNS
    with open(tmp_path / "out" / "per_example.csv", newline="") as handle:
        header = next(csv.reader(handle))
    curves = [metric.curve for metric in METRICS.values() if metric.curve is not None]
    assert sorted(header[4:]) == sorted(ALL_COLUMNS + curves)
    assert set(CURVE_COLUMNS) == set(curves)
    assert LOWER_IS_BETTER <= set(ALL_COLUMNS)


@pytest.mark.parametrize("metrics", [["deletion", "pointing"], ["deletion", "deletion"], []])
def test_both_runners_refuse_a_bad_request_with_the_registrys_message(tmp_path, metrics):
    with pytest.raises(ValueError) as expected:
        check_metric_names(metrics)
    message = str(expected.value)
    assert message == f"metrics must be distinct names from {list(METRICS)}, got {metrics}"
    with pytest.raises(ValueError) as loader_error:
        _loader_run(metrics)
    with pytest.raises(ValueError) as dataset_error:
        _dataset_run(tmp_path, metrics)
    assert str(loader_error.value) == str(dataset_error.value) == message


def test_the_command_line_offers_the_registrys_names_and_refuses_others(capsys, tmp_path):
    commands = argparse.ArgumentParser().add_subparsers()
    evaluate_command.add_parser(commands)
    parser = commands.choices["evaluate"]
    (option,) = [action for action in parser._actions if action.dest == "metrics"]
    assert option.choices == list(METRICS)

    from captum_normgrad.cli import main

    assert main(["evaluate", "--data", "voc:x", "--metrics", "pointing"]) == 1
    error = capsys.readouterr().err
    assert "invalid choice: 'pointing'" in error and all(name in error for name in METRICS)
    out = str(tmp_path / "out")
    assert main(["evaluate", "--data", "voc:x", "--metrics", "deletion", "deletion", "--out", out])
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(f"--metrics: metrics must be distinct names from {list(METRICS)}, got "
                         "['deletion', 'deletion']")  # fmt: skip


def test_the_registry_and_the_metric_options_import_without_torch():
    script = (
        "import sys\n"
        "import captum_normgrad._core.metric_names, captum_normgrad.cli._evaluate_data_options\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.split() == ["[]"]
