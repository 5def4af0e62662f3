"""The one exception the command line turns into a one-line message and exit status 1."""

from __future__ import annotations

__all__ = ["CliError"]


class CliError(Exception):
    """A user mistake: printed as one line on stderr, with a non-zero exit status."""
