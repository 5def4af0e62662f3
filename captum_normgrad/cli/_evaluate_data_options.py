"""The options of ``evaluate --data``, kept free of torch so that ``--help`` answers at once.

The work itself is in :mod:`captum_normgrad.cli._evaluate_data`, imported only when ``--data`` is
given.
"""

from __future__ import annotations

import argparse

from captum_normgrad._core.asset_names import BUNDLED_MODEL
from captum_normgrad._core.metric_names import METRICS, check_metric_names
from captum_normgrad.cli._errors import CliError
from captum_normgrad.cli._options import positive_int

__all__ = [
    "DATA_METRICS",
    "DATA_STEPS",
    "add_data_options",
    "check_data_metrics",
    "check_no_data_options",
]

DATA_METRICS = ["pointing_game"]
"""What ``--metrics`` is by default on a data set (TorchRay's benchmark)."""

DATA_STEPS = 50
"""Deletion / insertion steps on a data set by default (RISE's protocol)."""

# dest names of the options that only mean something with --data
_DATA_ONLY = (
    "split", "model", "weights", "num_classes", "metrics", "image_size", "crop", "mean", "std",
    "no_antialias", "difficult_flags", "limit", "threads", "device",
)  # fmt: skip


_GROUND_TRUTH_METRICS = [name for name, metric in METRICS.items() if metric.needs_ground_truth]


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``evaluate`` that take a data set instead of the bundled photos."""
    group = parser.add_argument_group("a data set instead of the bundled photos")
    group.add_argument(
        "--data",
        metavar="KIND:PATH",
        help="voc:VOCdevkit/VOC2007, coco:PATH (annotations/ and the split's image folder) or "
        f"folder:PATH (a folder per class; no {' or '.join(_GROUND_TRUTH_METRICS)})",
    )
    group.add_argument("--split", help="VOC image list (default test), COCO split (val2014)")
    group.add_argument(
        "--model",
        help=f"a torchvision architecture, timm:NAME (the timm extra) or hf:PATH (a local "
        f"save_pretrained folder; the huggingface extra) (default: {BUNDLED_MODEL}, bundled)",
    )
    group.add_argument(
        "--weights",
        help="a local state dict for a torchvision or timm --model: a torch.save file (loaded "
        "with weights_only=True) or a .safetensors file",
    )
    group.add_argument(
        "--num-classes", type=positive_int, help="outputs of --model (1000; an hf: model's config)"
    )
    group.add_argument(
        "--metrics",
        nargs="+",
        choices=list(METRICS),
        metavar="METRIC",
        help=f"any of {' '.join(METRICS)} (default: {' '.join(DATA_METRICS)})",
    )
    group.add_argument(
        "--image-size",
        type=positive_int,
        help="shorter side after resizing (default: 224; a timm or hf: model's own: its "
        "configured size over its crop fraction, timm's crop_pct or a Hugging Face processor's)",
    )
    group.add_argument(
        "--crop",
        type=positive_int,
        help="a centre square crop after resizing (default: none; a timm or hf: model's "
        "configured size). Either option replaces the model's resize and crop",
    )
    mean_help = (
        "default: the model's (timm's pretrained_cfg, an hf: folder's preprocessor_config.json, "
        "else ImageNet's)"
    )
    group.add_argument("--mean", nargs=3, type=float, metavar="M", help=mean_help)
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


def check_data_metrics(args: argparse.Namespace) -> None:
    """Refuse a repeated ``--metrics`` name before torch is imported (argparse checks each one)."""
    try:
        check_metric_names(args.metrics or DATA_METRICS)
    except ValueError as error:
        raise CliError(f"--metrics: {error}") from error
