"""The runner's result: one row per method and layer, printable and saveable as CSV."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field

from captum_normgrad._core.metric_names import LOWER_IS_BETTER

__all__ = ["MetricsTable"]

_KEY_COLUMNS = ("method", "layer", "examples")


@dataclass
class MetricsTable:
    """Rows of ``{"method", "layer", "examples", <metric columns>}``.

    ``print(table)`` shows it aligned, with a legend saying which direction is better;
    ``table.to_csv(path)`` saves it; ``table.rows`` is a list of dicts
    (``pandas.DataFrame(table.rows)`` where pandas is at hand).
    """

    columns: list[str]
    rows: list[dict[str, object]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[object]:
        """One column's values, row by row."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; the columns are {self.columns}")
        return [row[name] for row in self.rows]

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write the table as CSV with a header row, full float precision."""
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def __str__(self) -> str:
        def cell(value: object) -> str:
            if isinstance(value, float):
                return "nan" if math.isnan(value) else f"{value:.4f}"
            return str(value)

        def title(name: str) -> str:
            if name in _KEY_COLUMNS:
                return name
            return f"{name} {'(-)' if name in LOWER_IS_BETTER else '(+)'}"

        header = [title(name) for name in self.columns]
        body = [[cell(row[name]) for name in self.columns] for row in self.rows]
        widths = [max(len(text) for text in column) for column in zip(header, *body)]
        lines = [
            "  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
            for line in [header, *body]
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        lines.append("(+) higher is better, (-) lower is better")
        return "\n".join(lines)
