"""The ``captum-normgrad`` command: NormGrad beside Grad-CAM on a real model, with no network.

Three commands over the public API, defaulting to the bundled EfficientNet-Lite0 and photos
(:mod:`captum_normgrad.data`), one module each:

- ``captum-normgrad compare`` (:mod:`.compare`): every method at four depths on a two-object
  composite (a cat beside an espresso); writes the figure and prints time, pointing hits and class
  selectivity per method and layer.
- ``captum-normgrad explain --image PATH [--target CLASS] [--layers ...] [--methods ...]
  [--model efficientnet_lite0|<torchvision arch>|timm:NAME|hf:PATH --weights STATE_DICT.pt]``
  (:mod:`.explain`): your own image.
- ``captum-normgrad evaluate`` (:mod:`.evaluate`): the metrics over all bundled photos and
  composites; prints and saves the table and the deletion / insertion curves.

Exit status: 0 on success (and for ``--help`` / ``--version``); 1 for any mistake of the user's,
whether the command line is malformed (argparse's usage line and message) or an input is bad (a
missing or unreadable image, an unknown layer, a class out of range, weights that do not fit, an
output folder that cannot be written, a missing extra: one line on stderr); 130 when interrupted.

A new command is a module with ``add_parser(commands)`` (which sets ``run`` as the default) and
``run(args) -> int``, listed in :data:`COMMANDS`. The parser is built from torch-free modules and
each ``run`` imports what it needs, so ``--help`` and usage errors answer at interpreter speed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from captum_normgrad import __version__
from captum_normgrad.cli import compare, evaluate, explain
from captum_normgrad.cli._errors import CliError

__all__ = ["main"]

PROGRAM = "captum-normgrad"
COMMANDS = (compare, explain, evaluate)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="NormGrad saliency beside Captum's Grad-CAM, offline."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 1 a mistake, 130 interrupted)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help / --version (0), or argparse's usage error (2)
        return 0 if not exit_request.code else 1
    try:
        return args.run(args)
    except (CliError, ImportError) as error:  # ImportError: an extra is missing, and says which
        print(f"{PROGRAM}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return 130
