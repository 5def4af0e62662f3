"""``captum-normgrad evaluate``: the metrics over the bundled photos and composites, or a data set.

This module holds the options and the dispatch; the computation lives in
:mod:`captum_normgrad.cli._evaluate_bundled` (the bundled photos and composites) and
:mod:`captum_normgrad.cli._evaluate_data` (``--data KIND:PATH``, also under torchrun), imported only
when the command runs, so ``--help`` does not pay for torch.
"""

from __future__ import annotations

import argparse

from captum_normgrad.cli._evaluate_data_options import (
    DATA_STEPS,
    add_data_options,
    check_data_metrics,
    check_no_data_options,
)
from captum_normgrad.cli._options import add_common_options, positive_int

__all__ = ["EVALUATE_LAYERS", "EVALUATE_METHODS", "add_parser", "run"]

# Two depths keep the default run short: deletion and insertion dominate the cost (every step is a
# forward pass of every photo, for every method and layer).
EVALUATE_LAYERS = ("_blocks.10", "_bn1")
# Deletion / insertion steps on the bundled photos: a quick look, not RISE's 50.
_STEPS = 5
# The adversarial map shows what would degrade the model, not evidence for the class: the
# localisation and faithfulness metrics do not apply to it.
EVALUATE_METHODS = ["gradcam", "normgrad", "order1", "selective"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``evaluate`` and its options."""
    evaluate = commands.add_parser(
        "evaluate",
        help="metrics over the bundled photos and composites, or over a data set (--data, also "
        "under torchrun); prints and saves a table",
    )
    evaluate.add_argument(
        "--steps",
        type=positive_int,
        help=f"deletion/insertion steps (default: {_STEPS} on the bundled photos, {DATA_STEPS} "
        "with --data)",
    )
    add_common_options(evaluate, EVALUATE_METHODS, " ".join(EVALUATE_LAYERS))
    add_data_options(evaluate)
    evaluate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check the output folder first, then evaluate on ``--data`` or the bundled photos."""
    from captum_normgrad.cli._outputs import check_output_folder

    out = check_output_folder(args.out)  # before any computation
    if args.data is not None:
        check_data_metrics(args)
        from captum_normgrad.cli._evaluate_data import run_on_data

        return run_on_data(args, EVALUATE_LAYERS)
    check_no_data_options(args)
    args.steps = args.steps or _STEPS
    from captum_normgrad.cli._evaluate_bundled import evaluate_bundled

    return evaluate_bundled(args, args.layers or list(EVALUATE_LAYERS), out)
