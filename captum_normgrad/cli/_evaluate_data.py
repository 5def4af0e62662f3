"""``evaluate --data KIND:PATH``: methods x layers x metrics over a data set, also under torchrun.

Without ``--data`` the command keeps the bundled photos (:mod:`.evaluate`). With it, the command
hands the data set to :func:`captum_normgrad.evaluation.evaluate_dataset`, which shares the images
among torchrun's processes, appends per-example rows as they are computed (a rerun resumes) and
lets rank 0 write ``per_example.csv``, ``summary.csv`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from captum_normgrad.cli._errors import CliError
from captum_normgrad.cli._inputs import default_layer_names, resolve_layers
from captum_normgrad.cli._methods import METHODS, build_method
from captum_normgrad.cli._models import BUNDLED_MODEL, load_model
from captum_normgrad.cli._options import positive_int
from captum_normgrad.evaluation import (
    DATASET_METRICS,
    Preprocessing,
    evaluate_dataset,
    launched_by_torchrun,
    open_dataset,
)

__all__ = ["DATA_STEPS", "add_data_options", "check_no_data_options", "run_on_data"]

DATA_STEPS = 50
"""Deletion / insertion steps on a data set by default (RISE's protocol)."""

# dest names of the options that only mean something with --data
_DATA_ONLY = (
    "split", "model", "weights", "num_classes", "metrics", "image_size", "crop", "mean", "std",
    "no_antialias", "difficult_flags", "limit", "threads", "device",
)  # fmt: skip


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``evaluate`` that take a data set instead of the bundled photos."""
    group = parser.add_argument_group("a data set instead of the bundled photos")
    group.add_argument(
        "--data",
        metavar="KIND:PATH",
        help="voc:VOCdevkit/VOC2007, coco:PATH (annotations/ and the split's image folder) or "
        "folder:PATH (a folder per class; deletion and insertion only)",
    )
    group.add_argument("--split", help="VOC image list (default test), COCO split (val2014)")
    group.add_argument(
        "--model", help=f"a torchvision architecture (default: {BUNDLED_MODEL}, bundled)"
    )
    group.add_argument("--weights", help="a local state dict for --model (weights_only=True)")
    group.add_argument("--num-classes", type=positive_int, help="outputs of --model (1000)")
    group.add_argument(
        "--metrics",
        nargs="+",
        choices=list(DATASET_METRICS),
        metavar="METRIC",
        help=f"any of {' '.join(DATASET_METRICS)} (default: pointing)",
    )
    group.add_argument(
        "--image-size", type=positive_int, help="shorter side after resizing (default: 224)"
    )
    group.add_argument("--crop", type=positive_int, help="a centre square crop after resizing")
    group.add_argument("--mean", nargs=3, type=float, metavar="M", help="default: the model's")
    group.add_argument("--std", nargs=3, type=float, metavar="S", help="default: the model's")
    group.add_argument(
        "--no-antialias", action="store_true", help="resize without antialiasing (TorchRay, Caffe)"
    )
    group.add_argument(
        "--difficult-flags", metavar="FILE", help="TorchRay's EBP difficult-subset file"
    )
    group.add_argument("--limit", type=positive_int, help="only the first N images")
    group.add_argument(
        "--threads",
        type=positive_int,
        help="intra-op threads per process; per-example results are identical across numbers "
        "of processes at the same value",
    )
    group.add_argument("--device", choices=["cpu", "cuda"], help="default: CUDA when available")


def check_no_data_options(args: argparse.Namespace) -> None:
    """Without ``--data``, the data-set options are a mistake: say so instead of ignoring them."""
    given = [
        "--" + name.replace("_", "-")
        for name in _DATA_ONLY
        if getattr(args, name) not in (None, False)
    ]
    if given:
        raise CliError(
            f"{' '.join(given)} apply to a data set: add --data KIND:PATH (without it, evaluate "
            "uses the bundled photos)"
        )


def _output_folder(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"cannot create the output folder {out}: {error.strerror}") from error
    if not os.access(out, os.W_OK):
        raise CliError(f"cannot write into the output folder {out}")
    return out


def _device(choice: str | None) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: CUDA is not available")
    if choice == "cuda" or (choice is None and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def run_on_data(args: argparse.Namespace, bundled_layers: Sequence[str]) -> int:
    """The metrics over ``args.data``; rank 0 prints the summary and where the files are."""
    try:
        dataset = open_dataset(args.data, args.split)
    except ValueError as error:
        raise CliError(str(error)) from error
    if args.difficult_flags is not None and not Path(args.difficult_flags).is_file():
        raise CliError(f"difficult-subset file not found: {args.difficult_flags}")
    out = _output_folder(args.out)
    model = load_model(args.model or BUNDLED_MODEL, args.weights, args.num_classes or 1000)
    if args.layers:
        layer_names = args.layers
    elif model.name == BUNDLED_MODEL:
        layer_names = list(bundled_layers)
    else:
        layer_names = default_layer_names(model)
    layers = resolve_layers(model, layer_names)
    device = _device(args.device)
    module = model.module.to(device)
    methods = {METHODS[name].label: build_method(name, module, layers) for name in args.methods}
    try:
        table = evaluate_dataset(
            module,
            dataset,
            methods,
            out,
            args.metrics or ["pointing"],
            preprocessing=Preprocessing(
                resize=args.image_size or 224,
                crop=args.crop,
                mean=tuple(args.mean or model.mean),
                std=tuple(args.std or model.std),
                antialias=not args.no_antialias,
            ),
            n_steps=args.steps or DATA_STEPS,
            difficult_flags=args.difficult_flags,
            device=device,
            num_threads=args.threads,
            limit=args.limit,
            description={
                "data": args.data,
                "split": args.split,
                "model": model.name,
                "weights": args.weights,
                "layers": layer_names,
            },
            dpi=args.dpi,
        )
    except (ValueError, TypeError, RuntimeError) as error:
        raise CliError(f"evaluation failed: {error}") from error
    if table is not None:  # rank 0
        processes = os.environ["WORLD_SIZE"] if launched_by_torchrun() else "1"
        print(table)
        print(f"{args.data}: {len(dataset)} images, {processes} process(es)")
        print(f"per example: {out / 'per_example.csv'}\nsummary: {out / 'summary.csv'}")
        if (out / "curves.png").exists():
            print(f"figure: {out / 'curves.png'}")
    return 0
