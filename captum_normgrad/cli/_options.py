"""Options every command shares (layers, methods, output folder, figure resolution)."""

from __future__ import annotations

import argparse

from captum_normgrad.cli._methods import METHODS

__all__ = ["add_common_options", "positive_int"]


def positive_int(text: str) -> int:
    """An argparse type: a bad value is a usage error naming the option."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


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
