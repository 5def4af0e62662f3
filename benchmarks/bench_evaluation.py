"""Dataset evaluation: images/s with 1 and 2 processes (torchrun), and the time outside model passes.

A fixed CPU configuration: TorchRay's pointing game (shorter side 224, no crop) with a 20-class
ResNet-18 (random weights), NormGrad at ``layer3`` + ``layer4`` (one call) and Captum's Grad-CAM at
``layer4``, over a synthetic VOC-layout data set of JPEGs at VOC's usual 500x375, 1-3 objects each.
Each process uses ONE intra-op thread, so 2 processes on 2 cores is the ideal 2x.

*Model passes* are the methods' calls (forward + backward) and every other forward of the model
(the output check); everything else (JPEG decoding, resizing, upsampling maps to the original
size, the pointing game, writing rows, the final merge) is *outside*. Measured on rank 0 of the
single-process run. Figures are from one run on a shared machine: noisy; the load average is printed.

    python benchmarks/bench_evaluation.py                 # 32 images
    python benchmarks/bench_evaluation.py --images 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from captum.attr import LayerGradCam
from PIL import Image

from captum_normgrad import LayerNormGrad
from captum_normgrad.evaluation import VOC_CLASSES, Preprocessing, VOCDataset, evaluate_dataset


def write_dataset(root: Path, count: int) -> None:
    """``count`` noise JPEGs of 375x500 (or 500x375) with 1-3 random boxes each, VOC layout."""
    rng = np.random.default_rng(0)
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = [f"{index:06d}" for index in range(count)]
    for name in names:
        height, width = (375, 500) if rng.random() < 0.7 else (500, 375)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        objects = ""
        for _ in range(rng.integers(1, 4)):
            x0, y0 = int(rng.integers(1, width // 2)), int(rng.integers(1, height // 2))
            x1, y1 = int(rng.integers(x0 + 10, width)), int(rng.integers(y0 + 10, height))
            objects += (
                f"<object><name>{VOC_CLASSES[int(rng.integers(20))]}</name><difficult>0</difficult>"
                f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
                "</bndbox></object>"
            )
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height></size>{objects}</annotation>"
        )
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(names) + "\n")


class Timed:
    """A method whose calls are timed (they are the model passes it makes)."""

    def __init__(self, method, clock: dict) -> None:
        self.method, self.clock = method, clock
        self.layers = getattr(method, "layers", None) or [method.layer]

    def attribute(self, inputs, target=None, **kwargs):
        start = time.perf_counter()
        self.clock["inside_method"] = True
        try:
            return self.method.attribute(inputs, target=target, **kwargs)
        finally:
            self.clock["inside_method"] = False
            self.clock["model"] += time.perf_counter() - start


def worker(root: Path, out: Path) -> None:
    """One process's share of the run (under torchrun or alone); rank 0 prints JSON."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=20).eval()
    clock = {"model": 0.0, "inside_method": False, "forward_start": 0.0}

    def before(module, args):
        clock["forward_start"] = time.perf_counter()

    def after(module, args, output):
        if not clock["inside_method"]:
            clock["model"] += time.perf_counter() - clock["forward_start"]

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    methods = {
        "NormGrad": Timed(LayerNormGrad(model, [model.layer3, model.layer4]), clock),
        "Grad-CAM": (Timed(LayerGradCam(model, model.layer4), clock), {"relu_attributions": True}),
    }
    dataset = VOCDataset(root)
    start = time.perf_counter()
    evaluate_dataset(
        model, dataset, methods, out, ["pointing_game"], preprocessing=Preprocessing(resize=224),
        num_threads=1, progress=False,
    )  # fmt: skip
    total = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"images": len(dataset), "seconds": total, "model": clock["model"]}))


def run(processes: int, root: Path, out: Path) -> dict:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, __file__, "--worker", str(root), str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(finished.stderr[-3000:])
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--worker", nargs=2, metavar=("ROOT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "VOC"
        write_dataset(root, args.images)
        load_before = os.getloadavg()
        one = run(1, root, Path(folder) / "one")
        two = run(2, root, Path(folder) / "two")
        load_after = os.getloadavg()
        same = (Path(folder) / "one" / "per_example.csv").read_bytes() == (
            Path(folder) / "two" / "per_example.csv"
        ).read_bytes()
    rate_one, rate_two = one["images"] / one["seconds"], two["images"] / two["seconds"]
    print(f"{one['images']} images, ResNet-18, pointing game, NormGrad layer3+layer4 and Grad-CAM")
    print(f"1 process : {rate_one:.2f} images/s")
    print(f"2 processes: {rate_two:.2f} images/s  -> speed-up {rate_two / rate_one:.2f}x (ideal 2)")
    outside = 1 - one["model"] / one["seconds"]
    print(f"time outside model passes (1 process): {outside:.1%}")
    print(f"per-example files identical: {same}")
    print(f"load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f} "
          f"on {os.cpu_count()} cores")  # fmt: skip


if __name__ == "__main__":
    main()
