"""From the merged per-example rows to one row per method and layer, and the curves figure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from captum_normgrad._core.metric_names import CURVE_COLUMNS, PER_CLASS_COLUMNS
from captum_normgrad.evaluation.store import Row
from captum_normgrad.figures import plot_deletion_insertion, save_figure
from captum_normgrad.metrics import MetricsTable, pointing_game_accuracy

__all__ = ["save_curves_figure", "summarize"]


def _floats(rows: Sequence[Row], column: str) -> Tensor:
    return torch.tensor([float(row[column]) for row in rows], dtype=torch.float64)


def _mean(rows: Sequence[Row], column: str) -> float:
    values = _floats(rows, column)
    evaluated = ~torch.isnan(values)
    if not evaluated.any():
        return math.nan
    if column in PER_CLASS_COLUMNS:
        names = [row["class"] for row in rows]
        index = {name: position for position, name in enumerate(sorted(set(names)))}
        classes = torch.tensor([index[name] for name in names])
        return float(pointing_game_accuracy(values, classes))
    return float(values[evaluated].mean())


def _groups(
    rows: Sequence[Row], method_order: Sequence[str], layer_order: Sequence[str]
) -> dict[tuple[str, str], list[Row]]:
    """Rows by (method, layer): methods and layers in the given orders, unknown ones after."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["layer"]), []).append(row)
    methods = {name: position for position, name in enumerate(method_order)}
    layers = {name: position for position, name in enumerate(layer_order)}

    def order(key: tuple[str, str]) -> tuple:
        method, layer = key
        return (methods.get(method, len(methods)), method, layers.get(layer, len(layers)), layer)

    return {key: groups[key] for key in sorted(groups, key=order)}


def summarize(
    rows: Sequence[Row],
    columns: Sequence[str],
    method_order: Sequence[str] = (),
    layer_order: Sequence[str] = (),
) -> MetricsTable:
    """One row per method and layer: ``examples`` (pairs) and the mean of each metric column.

    The pointing-game columns are TorchRay's accuracy (per class, then the mean over classes);
    ``NaN`` values (pairs outside the difficult subset) are left out of every mean.
    """
    scalar_columns = [column for column in columns if column not in CURVE_COLUMNS]
    table = MetricsTable(columns=["method", "layer", "examples", *scalar_columns])
    for (method, layer), group in _groups(rows, method_order, layer_order).items():
        cells: dict[str, object] = {"method": method, "layer": layer, "examples": len(group)}
        cells.update({column: _mean(group, column) for column in scalar_columns})
        table.rows.append(cells)
    return table


def save_curves_figure(
    rows: Sequence[Row],
    path: Path,
    method_order: Sequence[str] = (),
    layer_order: Sequence[str] = (),
    dpi: int = 100,
) -> Path | None:
    """The mean deletion (and insertion) curves of every method and layer.

    Returns:
        The figure's path, or ``None`` when the rows hold no deletion curves (the figure's first
        panel).
    """
    present = [column for column in CURVE_COLUMNS if rows and column in rows[0]]
    if "deletion_curve" not in present:
        return None
    curves: dict[str, dict[str, Tensor]] = {column: {} for column in present}
    for (method, layer), group in _groups(rows, method_order, layer_order).items():
        for column in present:
            curves[column][f"{method} {layer}"] = torch.tensor(
                [[float(value) for value in row[column].split()] for row in group]
            )
    examples = len(rows) // len(curves["deletion_curve"])
    figure = plot_deletion_insertion(
        curves["deletion_curve"],
        curves.get("insertion_curve"),
        title=f"{examples} examples per method and layer",
    )
    return save_figure(figure, path, dpi=dpi)
