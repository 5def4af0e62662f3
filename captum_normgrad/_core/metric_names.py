"""The one registry of metric names: what ``metrics=`` and ``--metrics`` accept, what each fills.

:func:`captum_normgrad.metrics.evaluate_attributions`,
:func:`captum_normgrad.evaluation.evaluate_dataset` and ``captum-normgrad evaluate --metrics`` all take
their names, columns and checks from here, so a metric is spelled the same everywhere and its results
land in the same columns. Free of torch: the command line checks the names before it imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CURVE_COLUMNS",
    "DIFFICULT_POINTING_COLUMN",
    "LOWER_IS_BETTER",
    "METRICS",
    "PER_CLASS_COLUMNS",
    "Metric",
    "check_metric_names",
]


@dataclass(frozen=True)
class Metric:
    """What a runner needs to know about one metric.

    Attributes:
        columns: the per-example values it gives, one result column each (a table shows their
            means).
        lower_is_better: those of ``columns`` where a smaller number means a better map; the rest
            are higher-is-better.
        needs_ground_truth: it reads boxes or masks, so batches (or the data set) must carry them.
        per_class: its columns are averaged per class, then over classes (the pointing game's
            accuracy), instead of over examples.
        curve: the per-example curve a data-set run also stores beside ``columns`` (not averaged).
    """

    columns: tuple[str, ...]
    lower_is_better: frozenset[str] = frozenset()
    needs_ground_truth: bool = False
    per_class: bool = False
    curve: str | None = None


METRICS: dict[str, Metric] = {
    "deletion": Metric(
        ("deletion_auc",), lower_is_better=frozenset({"deletion_auc"}), curve="deletion_curve"
    ),
    "insertion": Metric(("insertion_auc",), curve="insertion_curve"),
    "confidence": Metric(
        ("average_drop", "increase_in_confidence"), lower_is_better=frozenset({"average_drop"})
    ),
    "pointing_game": Metric(("pointing_game",), needs_ground_truth=True, per_class=True),
    "localization": Metric(("localization_iou", "localization_accuracy"), needs_ground_truth=True),
    "selectivity": Metric(("selectivity",), lower_is_better=frozenset({"selectivity"})),
}
"""Every metric name the runners accept, in the order they are documented."""

DIFFICULT_POINTING_COLUMN = "pointing_game_difficult"
"""The pointing game over TorchRay's difficult subset only: a data-set run's extra column."""

LOWER_IS_BETTER = frozenset().union(*(metric.lower_is_better for metric in METRICS.values()))
"""Columns where a smaller number means a better map; every other metric column is higher-better."""

PER_CLASS_COLUMNS = frozenset(
    [DIFFICULT_POINTING_COLUMN]
    + [column for metric in METRICS.values() if metric.per_class for column in metric.columns]
)
"""Columns averaged per class, then over classes."""

CURVE_COLUMNS = tuple(metric.curve for metric in METRICS.values() if metric.curve is not None)
"""Per-example curves a data-set run stores; summaries leave them out."""


def check_metric_names(metrics: Sequence[str]) -> None:
    """Refuse anything but distinct names from :data:`METRICS`, listing the valid ones.

    Raises:
        ValueError: an unknown or repeated name, or no name at all.
    """
    if (
        isinstance(metrics, str)
        or not metrics
        or any(name not in METRICS for name in metrics)
        or len(set(metrics)) != len(metrics)
    ):
        shown = repr(metrics) if isinstance(metrics, str) else list(metrics)
        raise ValueError(f"metrics must be distinct names from {list(METRICS)}, got {shown}")
