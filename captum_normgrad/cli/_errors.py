"""The one exception the command line turns into a one-line message and exit status 1."""

from __future__ import annotations

__all__ = ["CliError", "first_line"]


class CliError(Exception):
    """A user mistake: printed as one line on stderr, with a non-zero exit status."""


def first_line(error: BaseException) -> str:
    """A third-party exception's first line (its name when it says nothing), to quote in a
    :class:`CliError` instead of its whole text."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
