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
from captum_normgrad.cli._evaluate_data_options import DATA_METRICS, DATA_STEPS
from captum_normgrad.cli._inputs import default_layer_names, probe_layers, resolve_layers
from captum_normgrad.cli._methods import METHODS, build_method
from captum_normgrad.cli._models import BUNDLED_MODEL, load_model
from captum_normgrad.evaluation import (
    Preprocessing,
    evaluate_dataset,
    launched_by_torchrun,
    open_dataset,
)

__all__ = ["run_on_data"]


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
    model = load_model(args.model or BUNDLED_MODEL, args.weights, args.num_classes)
    if args.layers:
        layer_names = args.layers
    elif model.name == BUNDLED_MODEL:
        layer_names = list(bundled_layers)
    else:
        layer_names = default_layer_names(model)
    # A timm or Hugging Face model's own resize and crop, unless the user chose the sizes.
    view = None if args.image_size or args.crop else model.configured_view()
    resize, crop = view or (args.image_size or 224, args.crop)
    # Which layers have a map is read from one forward pass at the size the model will see.
    side = crop or resize
    _, runs = probe_layers(model, torch.zeros(1, 3, side, side))
    layers = resolve_layers(model, layer_names, runs)
    device = _device(args.device)
    module = model.module.to(device)
    methods = {METHODS[name].label: build_method(name, module, layers) for name in args.methods}
    try:
        table = evaluate_dataset(
            module,
            dataset,
            methods,
            out,
            args.metrics or DATA_METRICS,
            preprocessing=Preprocessing(
                resize=resize,
                crop=crop,
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
