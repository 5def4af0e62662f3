"""The ``captum-normgrad`` command: NormGrad beside Grad-CAM on a real model, with no network.

Three commands over the public API, defaulting to the bundled EfficientNet-Lite0 and photos
(:mod:`captum_normgrad.data`):

- ``captum-normgrad compare``: every method at four depths on a two-object composite (a cat beside an
  espresso); writes the figure and prints time, pointing hits and class selectivity per method and
  layer.
- ``captum-normgrad explain --image PATH [--target CLASS] [--layers ...] [--methods ...]
  [--model efficientnet_lite0|<torchvision arch> --weights STATE_DICT.pt]``: your own image.
- ``captum-normgrad evaluate``: the metrics over all bundled photos and composites; prints and saves
  the table and the deletion / insertion curves.

A mistake in the input (missing or unreadable image, unknown layer, class out of range, weights that
do not fit) prints one line on stderr and exits with status 1; a malformed command line exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from captum_normgrad import data
from captum_normgrad._cli_commands import run_compare, run_explain
from captum_normgrad._cli_evaluate import EVALUATE_LAYERS, run_evaluate
from captum_normgrad._cli_inputs import BUNDLED_MODEL, CliError
from captum_normgrad._cli_methods import METHODS

__all__ = ["main"]

PROGRAM = "captum-normgrad"
# The paper's Figure 1 rows, then the authors' later selective variant.
COMPARE_METHODS = ["gradcam", "normgrad", "order1", "adversarial", "selective"]
EXPLAIN_METHODS = ["gradcam", "normgrad", "selective"]
# The adversarial map shows what would degrade the model, not evidence for the class: the
# localisation and faithfulness metrics do not apply to it.
EVALUATE_METHODS = ["gradcam", "normgrad", "order1", "selective"]


def _positive_int(text: str) -> int:
    """An argparse type: a bad value is a usage error (status 2) naming the option."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _method_help() -> str:
    return "; ".join(f"{name}: {method.description}" for name, method in METHODS.items())


def _add_common(parser: argparse.ArgumentParser, methods: list[str], layers: str) -> None:
    parser.add_argument(
        "--layers", nargs="+", metavar="NAME", help=f"module names in the model (default: {layers})"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=methods,
        metavar="METHOD",
        help=f"default: {' '.join(methods)}. {_method_help()}",
    )
    parser.add_argument(
        "--out", default="normgrad_out", help="folder for figures and tables (default: %(default)s)"
    )
    parser.add_argument(
        "--dpi",
        type=_positive_int,
        default=100,
        help="resolution of the figures (default: %(default)s)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="NormGrad saliency beside Captum's Grad-CAM, offline."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compare = commands.add_parser(
        "compare", help="all methods x several depths on a bundled two-object composite"
    )
    compare.add_argument("--left", default="chelsea", choices=data.SAMPLE_PHOTOS)
    compare.add_argument("--right", default="coffee", choices=data.SAMPLE_PHOTOS)
    _add_common(compare, COMPARE_METHODS, " ".join(data.EFFICIENTNET_LITE0_LAYERS))
    compare.set_defaults(run=run_compare)

    explain = commands.add_parser("explain", help="maps for your own image")
    explain.add_argument("--image", required=True, help="an image file (PNG, JPEG, ...)")
    explain.add_argument(
        "--target", help="class index or exact class name (default: the top-1 prediction)"
    )
    explain.add_argument(
        "--model",
        default=BUNDLED_MODEL,
        help=f"{BUNDLED_MODEL} (bundled, pretrained) or a torchvision architecture name",
    )
    explain.add_argument(
        "--weights",
        help="a local state dict for --model (loaded with torch.load(weights_only=True))",
    )
    explain.add_argument(
        "--num-classes",
        type=_positive_int,
        default=1000,
        help="outputs of a torchvision --model (default: %(default)s)",
    )
    explain.add_argument(
        "--image-size",
        type=_positive_int,
        default=224,
        help="side of the centre crop the model sees (default: %(default)s)",
    )
    _add_common(
        explain,
        EXPLAIN_METHODS,
        f"{' '.join(data.EFFICIENTNET_LITE0_LAYERS)} for {BUNDLED_MODEL}, four evenly spaced "
        "convolutions otherwise",
    )
    explain.set_defaults(run=run_explain)

    evaluate = commands.add_parser(
        "evaluate", help="metrics over the bundled photos and composites; prints and saves a table"
    )
    evaluate.add_argument(
        "--steps",
        type=_positive_int,
        default=5,
        help="deletion/insertion steps (default: %(default)s)",
    )
    _add_common(evaluate, EVALUATE_METHODS, " ".join(EVALUATE_LAYERS))
    evaluate.set_defaults(run=run_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 bad input, 2 bad usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, or argparse's own usage error
        return int(exit_request.code or 0)
    try:
        return args.run(args)
    except (CliError, ImportError) as error:  # ImportError: an extra is missing, and says which
        print(f"{PROGRAM}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
