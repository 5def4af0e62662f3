"""Two processes under torchrun give the files of one; a run stopped part-way resumes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from captum.attr import LayerGradCam
from evaluation_datasets import VOC_IMAGES, CountingMethod, voc_classifier, write_voc
from model_state import assert_model_unchanged, model_snapshot

from captum_normgrad.evaluation import Preprocessing, VOCDataset, World, evaluate_dataset, shard

METRICS = ["pointing_game", "localization", "deletion", "insertion"]
TESTS = Path(__file__).parent

_WORKER = """
import os, sys
from pathlib import Path
from captum.attr import LayerGradCam
from evaluation_datasets import CountingMethod, voc_classifier
from captum_normgrad.evaluation import Preprocessing, VOCDataset, evaluate_dataset

model = voc_classifier()
normgrad = CountingMethod(model)
methods = {"NormGrad": normgrad,
           "Grad-CAM": (LayerGradCam(model, model[2]), {"relu_attributions": True})}
evaluate_dataset(model, VOCDataset(sys.argv[1]), methods, sys.argv[2], %(metrics)r,
                 preprocessing=Preprocessing(resize=16), n_steps=3, num_threads=1,
                 progress=False)
Path(sys.argv[2], "calls-rank" + os.environ["RANK"]).write_text(str(normgrad.calls))
"""


def _run(root: Path, out: Path, method: CountingMethod | None = None, **options):
    model = voc_classifier() if method is None else method._model
    method = method or CountingMethod(model)
    methods = {
        "NormGrad": method,
        "Grad-CAM": (LayerGradCam(model, model[2]), {"relu_attributions": True}),
    }
    evaluate_dataset(
        model, VOCDataset(root), methods, out, METRICS, preprocessing=Preprocessing(resize=16),
        n_steps=3, num_threads=1, progress=False, **options,
    )  # fmt: skip
    return method


def _files(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir()) if path.suffix == ".csv"}


def test_strided_shards_cover_every_index_once():
    for count in range(8):
        for size in (1, 2, 3):
            shares = [list(shard(count, World(rank, size, None))) for rank in range(size)]
            assert sorted(sum(shares, [])) == list(range(count))


def test_two_torchrun_processes_write_what_one_process_writes(tmp_path, one_thread):
    assert len(VOC_IMAGES) % 2 == 1  # an odd data set: the shares differ
    root = write_voc(tmp_path / "voc")
    single = _run(root, tmp_path / "one")
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(_WORKER % {"metrics": METRICS}))
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(worker), str(root), str(tmp_path / "two")]  # fmt: skip
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    calls = [int((tmp_path / "two" / f"calls-rank{rank}").read_text()) for rank in (0, 1)]
    assert calls == [3, 2]  # images 0, 2, 4 and 1, 3: each exactly once
    assert single.calls == 5
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert not (tmp_path / "two" / "parts").exists()


def test_a_stopped_run_resumes_without_recomputing(tmp_path, one_thread):
    root = write_voc(tmp_path / "voc")
    _run(root, tmp_path / "whole")
    model = voc_classifier()
    before = model_snapshot(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(root, tmp_path / "resumed", CountingMethod(model, fail_after=2))
    (part,) = (tmp_path / "resumed" / "parts").iterdir()
    with part.open("a") as handle:  # a kill while writing the next row leaves a torn line
        handle.write("000003,car,NormGrad,0,1.0,0.5")
    restarted = _run(root, tmp_path / "resumed", CountingMethod(model))
    assert restarted.calls == 3  # the two finished images are not explained again
    assert_model_unchanged(model, before)
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")
    assert (tmp_path / "resumed" / "curves.png").exists()
    again = _run(root, tmp_path / "resumed", CountingMethod(model))
    assert again.calls == 0


def test_a_folder_of_another_configuration_is_refused(tmp_path, one_thread):
    root = write_voc(tmp_path / "voc")
    _run(root, tmp_path / "out", limit=1)
    with pytest.raises(ValueError, match="tolerance: 15 there, 10 now"):
        _run(root, tmp_path / "out", tolerance=10)
