"""The output folder, checked before any computation: a bad ``--out`` costs nothing, loses nothing."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from captum_normgrad.cli._errors import CliError

__all__ = ["check_output_folder", "writing"]


def check_output_folder(out: str | Path) -> Path:
    """Prove that ``out`` can be created (if missing) and written, without creating it.

    An existing file, a path under a regular file, a read-only folder or file system: each is one
    :class:`CliError` naming ``--out`` and the reason, raised before the model is even loaded. The
    proof is a temporary file written (and removed) in ``out`` or its nearest existing ancestor:
    unlike ``os.access`` it also catches read-only mounts, and is right for root, who passes every
    permission bit. A run that fails later leaves no empty folder behind.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise CliError(f"--out {folder} is an existing file, not a folder; choose a folder")
    ancestor = folder.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CliError(f"cannot create --out {folder}: {ancestor} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise CliError(f"cannot write to --out {folder}: {reason} in {ancestor}") from error
    return folder


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Writing ``path`` after the computation: a failure (disk full, folder removed meanwhile) is
    one line naming the file, and whatever was printed before it stays on the screen."""
    try:
        yield
    except OSError as error:
        raise CliError(f"cannot write {path}: {error.strerror or error}") from error
