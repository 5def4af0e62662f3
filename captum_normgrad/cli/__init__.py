"""The ``captum-normgrad`` command: NormGrad beside Grad-CAM on a real model, with no network.

Three commands over the public API, defaulting to the bundled EfficientNet-Lite0 and photos
(:mod:`captum_normgrad.data`), one module each:

- ``captum-normgrad compare`` (:mod:`.compare`): every method at four depths on a two-object
  composite (a cat beside an espresso); writes the figure and prints time, pointing hits and class
  selectivity per method and layer.
- ``captum-normgrad explain --image PATH [--target CLASS] [--layers ...] [--methods ...]
  [--model efficientnet_lite0|<torchvision arch> --weights STATE_DICT.pt]`` (:mod:`.explain`): your
  own image.
- ``captum-normgrad evaluate`` (:mod:`.evaluate`): the metrics over all bundled photos and
  composites; prints and saves the table and the deletion / insertion curves.

A mistake in the input (missing or unreadable image, unknown layer, class out of range, weights that
do not fit) prints one line on stderr and exits with status 1; a malformed command line exits with 2.
A new command is a module with ``add_parser(commands)`` (which sets ``run`` as the default) and
``run(args) -> int``, listed in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from captum_normgrad.cli import compare, evaluate, explain
from captum_normgrad.cli._errors import CliError

__all__ = ["main"]

PROGRAM = "captum-normgrad"
COMMANDS = (compare, explain, evaluate)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="NormGrad saliency beside Captum's Grad-CAM, offline."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
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
