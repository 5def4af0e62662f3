"""Per-example results on disk: appended as computed, one part file per process, merged at the end.

A row is one (image, class, method, layer) with one column per metric. Every process appends its
rows to its own part file in ``DIR/parts/`` and flushes after each image, so a killed run loses at
most the image in flight (a torn last line is ignored when read back). On start every process reads
what is already in ``DIR`` (the merged file and every part, whichever number of processes wrote
them) and skips the keys found there. Rank 0 merges the parts into ``DIR/per_example.csv``, sorted
by key, so the file does not depend on how the images were shared among processes.

Floats are written with ``repr`` (they read back bit for bit); a curve is one column of
space-separated values.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["KEY_COLUMNS", "PER_EXAMPLE_FILE", "ResultsStore", "check_config"]

KEY_COLUMNS = ("image", "class", "method", "layer")
PER_EXAMPLE_FILE = "per_example.csv"
_CONFIG_FILE = "config.json"
_PARTS = "parts"

Row = dict[str, str]
Key = tuple[str, str, str, str]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return " ".join(repr(float(item)) for item in value)
    return str(value)


def _complete_lines(path: Path) -> str:
    """The file's text up to its last newline: a line torn by a kill is dropped."""
    with path.open(newline="") as handle:
        text = handle.read()
    return text[: text.rfind("\n") + 1]


def _read_rows(path: Path) -> list[Row]:
    return list(csv.DictReader(io.StringIO(_complete_lines(path), newline="")))


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, newline="")
    os.replace(temporary, path)


def check_config(directory: Path, config: Mapping[str, Any], rank: int) -> None:
    """Refuse to resume into ``directory`` if it holds results of another configuration.

    Rank 0 records the configuration on the first run. Every process compares, so each one
    raises the same error.

    Raises:
        ValueError: naming the settings that differ, and what to do.
    """
    path = directory / _CONFIG_FILE
    config = json.loads(json.dumps(config))  # tuples -> lists, as they read back
    if path.exists():
        recorded = json.loads(path.read_text())
        differing = sorted(
            key for key in {*recorded, *config} if recorded.get(key) != config.get(key)
        )
        if differing:
            details = "; ".join(
                f"{key}: {recorded.get(key)!r} there, {config.get(key)!r} now" for key in differing
            )
            raise ValueError(
                f"{directory} holds results of another configuration ({details}); use another "
                "output folder, or delete it to start again"
            )
    elif rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


class ResultsStore:
    """The per-example results of one output folder, as seen by one process.

    Args:
        directory: the output folder (shared by all processes, also across machines).
        columns: the metric columns, after the key columns (``KEY_COLUMNS``).
        rank: this process's rank; names its part file.
    """

    def __init__(self, directory: str | os.PathLike, columns: Iterable[str], rank: int = 0) -> None:
        self.directory = Path(directory)
        self.columns = [*KEY_COLUMNS, *columns]
        self.rank = rank
        self._part: Path | None = None

    def _part_files(self) -> list[Path]:
        parts = self.directory / _PARTS
        return sorted(parts.glob("*.csv")) if parts.is_dir() else []

    def _sources(self) -> list[Path]:
        merged = self.directory / PER_EXAMPLE_FILE
        return ([merged] if merged.exists() else []) + self._part_files()

    def finished_keys(self) -> set[Key]:
        """Every key already written by any earlier or concurrent process."""
        return {
            tuple(row[column] for column in KEY_COLUMNS)  # type: ignore[misc]
            for source in self._sources()
            for row in _read_rows(source)
        }

    def append(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Append rows to this process's part file and flush them to the OS."""
        rows = list(rows)
        if not rows:
            return
        if self._part is None:
            parts = self.directory / _PARTS
            parts.mkdir(parents=True, exist_ok=True)
            # A new file per launch: a restarted run never appends after a torn line.
            self._part = parts / f"rank{self.rank:05d}-{os.getpid()}-{time.time_ns()}.csv"
            with self._part.open("w", newline="") as handle:
                csv.writer(handle, lineterminator="\n").writerow(self.columns)
        with self._part.open("a", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            for row in rows:
                writer.writerow([_cell(row[column]) for column in self.columns])
            handle.flush()

    def merge(self) -> list[Row]:
        """Rank 0, after every process finished: all rows, sorted by key, into ``per_example.csv``.

        The part files are removed once the merged file is in place, so a finished folder holds
        exactly what an uninterrupted single-process run writes.

        Raises:
            ValueError: one key with two different rows (two runs wrote into the same folder at
                once with different code).
        """
        sources = self._sources()
        rows: dict[Key, Row] = {}
        for source in sources:
            for row in _read_rows(source):
                key = tuple(row[column] for column in KEY_COLUMNS)
                known = rows.setdefault(key, row)  # type: ignore[arg-type]
                if known != row:
                    raise ValueError(f"two different results for {key} in {self.directory}")
        ordered = [rows[key] for key in sorted(rows)]
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(ordered)
        _write_atomically(self.directory / PER_EXAMPLE_FILE, buffer.getvalue())
        for part in self._part_files():
            part.unlink()
        parts = self.directory / _PARTS
        if parts.is_dir() and not any(parts.iterdir()):
            parts.rmdir()
        return ordered
