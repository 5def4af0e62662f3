"""Evaluating several attribution methods over a data set with several metrics, in one table.

Each batch from the loader is ``(images, labels)`` or ``(images, labels, ground_truth)``. Every
method explains every batch once; its maps (one per layer for a multi-layer NormGrad) go through
every metric; the per-example values are averaged at the end into one row per method and layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from captum_normgrad._core.methods import Method, call_method, method_layer_names
from captum_normgrad._core.metric_names import METRICS, PER_CLASS_COLUMNS, check_metric_names
from captum_normgrad._core.model_state import preserved_buffers
from captum_normgrad._core.scores import Score
from captum_normgrad.metrics.confidence import (
    confidence_drop,
    confidence_increase,
    explanation_scores,
)
from captum_normgrad.metrics.deletion import deletion_auc, insertion_auc
from captum_normgrad.metrics.localization import localization_hits, localization_iou
from captum_normgrad.metrics.pointing import pointing_game, pointing_game_accuracy
from captum_normgrad.metrics.similarity import class_selectivity, contrast_classes
from captum_normgrad.metrics.table import MetricsTable

__all__ = ["evaluate_attributions"]


def _split_batch(batch: object, needs_ground_truth: bool) -> tuple[Tensor, Tensor, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(
            "each batch must be (images, labels) or (images, labels, ground_truth), got "
            f"{type(batch).__name__}"
        )
    images, labels = batch[0], torch.as_tensor(batch[1])
    ground_truth = batch[2] if len(batch) == 3 else None
    if needs_ground_truth and ground_truth is None:
        raise ValueError(
            "the pointing game and localization need batches (images, labels, ground_truth)"
        )
    return images, labels, ground_truth


def _metric_values(
    name: str,
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    ground_truth: Any,
    options: dict[str, Any],
) -> dict[str, Tensor]:
    if name == "deletion":
        return {"deletion_auc": deletion_auc(model, images, maps, targets, **options["curve"])}
    if name == "insertion":
        return {"insertion_auc": insertion_auc(model, images, maps, targets, **options["curve"])}
    if name == "confidence":
        original, explained = explanation_scores(model, images, maps, targets, **options["score"])
        return {
            "average_drop": confidence_drop(original, explained),
            "increase_in_confidence": confidence_increase(original, explained),
        }
    if name == "pointing_game":
        kind = options["ground_truth"]
        return {
            "pointing_game": pointing_game(
                maps,
                **{kind: ground_truth},
                image_size=images.shape[-2:] if kind == "boxes" else None,
                tolerance=options["tolerance"],
            )
        }
    if name == "localization":
        ious = localization_iou(maps, ground_truth, images.shape[-2:], options["threshold"])
        return {"localization_iou": ious, "localization_accuracy": localization_hits(ious)}
    raise AssertionError(name)


def _mean(column: str, values: Tensor, classes: Tensor) -> float:
    if column in PER_CLASS_COLUMNS:
        return float(pointing_game_accuracy(values, classes))
    return float(values.double().mean())


def evaluate_attributions(
    model: nn.Module,
    methods: Mapping[str, Method | tuple[Method, Mapping[str, Any]]],
    loader: Iterable,
    metrics: Sequence[str] = ("deletion", "insertion", "confidence"),
    *,
    target: Literal["label", "predicted"] = "label",
    ground_truth: Literal["boxes", "masks"] = "boxes",
    n_steps: int = 50,
    chunk_size: int = 64,
    score: Score = "probability",
    tolerance: float = 15,
    threshold: float = 0.2,
    contrast: Literal["second", "last"] = "second",
    progress: bool = True,
) -> MetricsTable:
    """Run every method on every batch and every metric on every map; one row per method x layer.

    Args:
        model: the classifier the methods explain and the metrics query, in ``eval()`` mode.
        methods: display name -> a Captum-style method (``.attribute(inputs, target=...)``) or
            callable, or a ``(method, attribute_kwargs)`` pair, e.g.
            ``{"Grad-CAM": (LayerGradCam(model, model.layer4), {"relu_attributions": True})}``.
            A method returning one map per layer gives one row per layer.
        loader: yields ``(images, labels)`` or ``(images, labels, ground_truth)``, ``ground_truth``
            being boxes (per example a ``(K, 4)`` tensor or ``None``) or ``(N, H, W)`` masks.
        metrics: any of ``captum_normgrad.metrics.METRICS``: ``"deletion"`` (AUC, lower
            better), ``"insertion"`` (AUC, higher better), ``"confidence"`` (average drop, lower
            better; increase in confidence, higher better), ``"pointing_game"`` (per-class
            accuracy), ``"localization"`` (IoU and accuracy at IoU >= 0.5), ``"selectivity"``
            (rank correlation with the map for the ``contrast`` class, lower better).
        target: explain the loader's label or the model's top-1 prediction.
        ground_truth: what the batches' third element holds.
        n_steps: deletion / insertion steps.
        chunk_size: perturbed images per forward pass.
        score: ``"probability"``, ``"output"`` or a callable on outputs (faithfulness metrics).
        tolerance: pointing-game tolerance in pixels.
        threshold: localization threshold, a fraction of the normalised maximum.
        contrast: the other class for selectivity: ``"second"`` (the best-scoring other class) or
            ``"last"`` (the worst-scoring).
        progress: show a progress bar over batches.

    Returns:
        A :class:`MetricsTable` with columns ``method, layer, examples`` and each metric's means
        (fractions, not percent). The pointing game is averaged per class (the loader's labels).
        The pointing game and localization skip an example without ground truth (``None`` boxes,
        an empty mask), as their standalone functions do; an undefined value (a constant map's
        selectivity) is skipped too. Every mean of a row is then over the same examples, those
        every requested metric could score, so the numbers of a row compare like with like, and
        ``examples`` counts them.

    Raises:
        ValueError: an unknown metric, a batch without ground truth for a metric that needs it, no
            example that every metric could score, or any metric's own input errors.
    """
    check_metric_names(metrics)
    if target not in ("label", "predicted"):
        raise ValueError(f"target must be 'label' or 'predicted', got {target!r}")
    if contrast not in ("second", "last"):
        raise ValueError(f"contrast must be 'second' or 'last', got {contrast!r}")
    if ground_truth not in ("boxes", "masks"):
        raise ValueError(f"ground_truth must be 'boxes' or 'masks', got {ground_truth!r}")
    if model.training:
        warnings.warn(
            "the model is in training mode: dropout and batch statistics make the metrics noisy; "
            "call model.eval() first",
            stacklevel=2,
        )
    options = {
        "curve": {"n_steps": n_steps, "chunk_size": chunk_size, "score": score},
        "score": {"chunk_size": chunk_size, "score": score},
        "ground_truth": ground_truth,
        "tolerance": tolerance,
        "threshold": threshold,
    }
    needs_outputs = target == "predicted" or "selectivity" in metrics
    needs_ground_truth = any(METRICS[name].needs_ground_truth for name in metrics)
    columns = [column for name in metrics for column in METRICS[name].columns]
    values: dict[tuple[str, str], dict[str, list[Tensor]]] = {}
    classes: list[Tensor] = []
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc="evaluating", unit="batch", disable=not progress):
        images, labels, truth = _split_batch(batch, needs_ground_truth)
        classes.append(labels.cpu())
        targets = labels.to(images.device)
        if needs_outputs:
            with torch.no_grad(), preserved_buffers([model]):
                outputs = model(images)
            if target == "predicted":
                targets = outputs.argmax(dim=1)
        for method_name, spec in methods.items():
            method, kwargs = spec if isinstance(spec, tuple) else (spec, None)
            maps = call_method(method, images, targets, kwargs)
            if "selectivity" in metrics:
                others = call_method(
                    method, images, contrast_classes(outputs, targets, contrast), kwargs
                )
            for index, (layer, layer_map) in enumerate(
                zip(method_layer_names(method, model, len(maps)), maps)
            ):
                row = values.setdefault((method_name, layer), {column: [] for column in columns})
                for name in metrics:
                    if name == "selectivity":
                        new = {"selectivity": class_selectivity(layer_map, others[index])}
                    else:
                        new = _metric_values(
                            name, model, images, layer_map, targets, truth, options
                        )
                    for column, column_values in new.items():
                        row[column].append(column_values.detach().cpu())
    all_classes = torch.cat(classes) if classes else torch.zeros(0, dtype=torch.long)
    return _table(values, columns, all_classes)


def _table(
    values: dict[tuple[str, str], dict[str, list[Tensor]]], columns: list[str], classes: Tensor
) -> MetricsTable:
    """Per-example values of every batch -> one row of means per method and layer.

    Every mean of a row is over the same examples, those every metric could score (``NaN`` marks
    a skipped one), and ``examples`` counts them.
    """
    table = MetricsTable(columns=["method", "layer", "examples", *columns])
    for (method_name, layer), row in values.items():
        per_example = {column: torch.cat(row[column]) for column in columns}
        scored = torch.stack([~column_values.isnan() for column_values in per_example.values()])
        scored = scored.all(dim=0)
        if not scored.any():
            skipping = [column for column, cells in per_example.items() if cells.isnan().any()]
            raise ValueError(
                f"no example could be scored by every metric for {method_name} at {layer}: "
                f"{', '.join(skipping)} skipped them all (no ground truth given?)"
            )
        cells: dict[str, object] = {
            "method": method_name,
            "layer": layer,
            "examples": int(scored.sum()),
        }
        for column, column_values in per_example.items():
            cells[column] = _mean(column, column_values[scored], classes[scored])
        table.rows.append(cells)
    return table
