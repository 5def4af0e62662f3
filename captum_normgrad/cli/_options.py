"""Options every command shares (layers, methods, output folder, figure resolution)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from captum_normgrad.cli._methods import METHODS

__all__ = ["add_common_options", "add_repeats_option", "non_negative_int", "positive_int"]


def _integer_at_least(minimum: int, kind: str) -> Callable[[str], int]:
    """An argparse type: a bad value is a usage error naming the option and what it must be."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not a {kind} integer")
        return value

    parse.__name__ = f"{kind} integer"  # what argparse names in "invalid ... value"
    return parse


positive_int = _integer_at_least(1, "positive")
non_negative_int = _integer_at_least(0, "non-negative")  # counts where 0 means "none"


def add_repeats_option(parser: argparse.ArgumentParser) -> None:
    """``--repeats N``: time each method as the median of N warm calls (default 0: no timing).

    Timing is opt-in: one cold call is no measurement (it read 0.13 s and 3.6 s for the same method
    on a busy machine), and N proper repeats multiply the command's cost by N + 1.
    """
    parser.add_argument(
        "--repeats",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="add a seconds column: the median of N calls of each method after the (warm-up) call "
        "that drew the maps (default: %(default)s, no timing)",
    )


def _method_help() -> str:
    return "; ".join(f"{name}: {method.description}" for name, method in METHODS.items())


def add_common_options(parser: argparse.ArgumentParser, methods: list[str], layers: str) -> None:
    """``--layers``, ``--methods`` (default ``methods``), ``--out`` and ``--dpi``."""
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
        type=positive_int,
        default=100,
        help="resolution of the figures (default: %(default)s)",
    )
