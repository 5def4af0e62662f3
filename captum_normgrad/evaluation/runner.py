"""Methods x layers x metrics over a data set, on one process or many under torchrun.

Each image is read, preprocessed and explained alone, for all of its pairs at once (a batch of one
copy per ground-truth class, each with that class as the target): images of different sizes need
no padding, and an image's results do not depend on which process computed it. Every method is
called once per image; a NormGrad method given several layers returns all of their maps from that
one call.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from captum_normgrad._core.front_door import explained_output
from captum_normgrad._core.methods import (
    Method,
    call_method,
    declared_layers,
    method_layer_names,
)
from captum_normgrad._core.metric_names import (
    DIFFICULT_POINTING_COLUMN,
    METRICS,
    check_metric_names,
)
from captum_normgrad._core.model_state import preserved_buffers
from captum_normgrad._core.scores import Score
from captum_normgrad.evaluation.dataset import EvaluationDataset, Example, read_image
from captum_normgrad.evaluation.distributed import barrier, process_group, shard
from captum_normgrad.evaluation.preprocess import Preprocessing, maps_at_original_size
from captum_normgrad.evaluation.protocol import (
    in_difficult_subset,
    pointing_hits,
    read_difficult_flags,
)
from captum_normgrad.evaluation.store import ResultsStore, check_config
from captum_normgrad.evaluation.summary import save_curves_figure, summarize
from captum_normgrad.metrics import (
    MetricsTable,
    area_under_curve,
    class_selectivity,
    confidence_drop,
    confidence_increase,
    contrast_classes,
    deletion_curve,
    explanation_scores,
    insertion_curve,
    localization_hits,
    localization_iou,
)

__all__ = ["evaluate_dataset"]


@contextmanager
def _threads(count: int | None):
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _columns(metrics: Sequence[str], difficult: bool) -> list[str]:
    """The per-example columns: each metric's values, then its curve, as the registry names them."""
    columns = []
    for name in metrics:
        metric = METRICS[name]
        columns += metric.columns
        if metric.curve is not None:
            columns.append(metric.curve)
        if name == "pointing_game" and difficult:
            columns.append(DIFFICULT_POINTING_COLUMN)
    return columns


def _needs_ground_truth(metrics: Sequence[str]) -> bool:
    return any(METRICS[name].needs_ground_truth for name in metrics)


def _check_outputs(model: nn.Module, inputs: Tensor, num_classes: int) -> None:
    with torch.no_grad(), preserved_buffers([model]):
        outputs = explained_output(model(inputs))
    if outputs.dim() != 2 or outputs.shape[1] != num_classes:
        raise ValueError(
            f"the model gives outputs of shape {tuple(outputs.shape)} but the data set has "
            f"{num_classes} classes: its class k must be the model's output k (give a model "
            "trained on this data set, e.g. --num-classes)"
        )


class _ImageEvaluator:
    """Everything that stays fixed over the images: model, methods, metrics, options."""

    def __init__(self, model, dataset, methods, metrics, options, flags, world) -> None:
        self.model, self.dataset, self.metrics, self.options = model, dataset, metrics, options
        self.methods = {
            name: spec if isinstance(spec, tuple) else (spec, None)
            for name, spec in methods.items()
        }
        self.flags, self.world = flags, world
        self.layer_names: dict[str, list[str]] = {}
        for name, (method, _) in self.methods.items():
            layers = declared_layers(method)
            if layers is not None:
                self.layer_names[name] = method_layer_names(method, model, len(layers))
        self.checked_outputs = False

    def _pending(self, image_id: str, names: list[str], method: str, done: set) -> bool:
        """Whether a method has a row left to compute on this image (unknown layers: yes)."""
        layers = self.layer_names.get(method)
        return layers is None or any(
            (image_id, name, method, layer) not in done for name in names for layer in layers
        )

    def rows(self, example: Example, done: set) -> list[dict[str, object]]:
        """The rows of ``example`` not in ``done``; the image is not read when none is left."""
        classes = self.dataset.pair_classes(example)
        names = [self.dataset.classes[index] for index in classes]
        pending = [m for m in self.methods if self._pending(example.image_id, names, m, done)]
        if not classes or not pending:
            return []
        image = read_image(example)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        inputs, region = self.options["preprocessing"](image)
        inputs = inputs.to(self.world.device)
        if not self.checked_outputs:
            _check_outputs(self.model, inputs, len(self.dataset.classes))
            self.checked_outputs = True
        batch = inputs.expand(len(classes), -1, -1, -1).contiguous()
        targets = torch.tensor(classes, device=inputs.device)
        masks = None
        if _needs_ground_truth(self.metrics):
            masks = torch.stack([self.dataset.class_mask(example, c, size) for c in classes])
        if "selectivity" in self.metrics:
            with torch.no_grad(), preserved_buffers([self.model]):
                outputs = explained_output(self.model(batch))
            others = contrast_classes(outputs, targets, self.options["contrast"])
        rows = []
        for method_name in pending:
            method, kwargs = self.methods[method_name]
            maps = call_method(method, batch, targets, kwargs)
            other_maps = None
            if "selectivity" in self.metrics:
                other_maps = call_method(method, batch, others, kwargs)
            layers = method_layer_names(method, self.model, len(maps))
            self.layer_names[method_name] = layers
            for index, (layer, layer_map) in enumerate(zip(layers, maps)):
                values = self._metric_values(
                    example, classes, batch, targets, layer_map, masks, region, size
                )
                if other_maps is not None:
                    selectivity = class_selectivity(layer_map, other_maps[index])
                    values["selectivity"] = selectivity.double().cpu().tolist()
                for position, name in enumerate(names):
                    key = (example.image_id, name, method_name, layer)
                    if key not in done:
                        row = dict(zip(("image", "class", "method", "layer"), key))
                        row.update({column: value[position] for column, value in values.items()})
                        rows.append(row)
        return rows

    def _metric_values(self, example, classes, batch, targets, layer_map, masks, region, size):
        if layer_map.dim() != 4 or layer_map.shape[1] != 1:
            raise ValueError(
                f"a method returned maps of shape {tuple(layer_map.shape)}; the metrics need "
                "(N, 1, h, w): reduce an input attribution's channels first (e.g. "
                "attributions.abs().amax(dim=1, keepdim=True))"
            )
        values: dict[str, list[object]] = {}
        original = None
        if masks is not None:
            original = maps_at_original_size(layer_map.cpu(), region, size)
        if "pointing_game" in self.metrics:
            hits = pointing_hits(original, masks, self.options["tolerance"])
            values["pointing_game"] = hits.tolist()
            if self.flags is not None:
                values[DIFFICULT_POINTING_COLUMN] = [
                    hit if in_difficult_subset(self.flags, example.image_id, c) else float("nan")
                    for hit, c in zip(hits.tolist(), classes)
                ]
        if "localization" in self.metrics:
            boxes = [
                torch.tensor([a.box for a in example.annotations if a.class_index == c])
                for c in classes
            ]
            ious = localization_iou(original, boxes, size, self.options["threshold"])
            values["localization_iou"] = ious.double().tolist()
            values["localization_accuracy"] = localization_hits(ious).double().tolist()
        if "confidence" in self.metrics:
            original_scores, explained = explanation_scores(
                self.model, batch, layer_map, targets,
                chunk_size=self.options["chunk_size"], score=self.options["score"],
            )  # fmt: skip
            drop = confidence_drop(original_scores, explained)
            values["average_drop"] = drop.double().cpu().tolist()
            increase = confidence_increase(original_scores, explained)
            values["increase_in_confidence"] = increase.double().cpu().tolist()
        for name, curve_function in (("deletion", deletion_curve), ("insertion", insertion_curve)):
            if name in self.metrics:
                curves = curve_function(
                    self.model, batch, layer_map, targets, self.options["n_steps"],
                    chunk_size=self.options["chunk_size"], score=self.options["score"],
                )  # fmt: skip
                values[f"{name}_auc"] = area_under_curve(curves).double().tolist()
                values[f"{name}_curve"] = curves.double().cpu().tolist()
        return values


def evaluate_dataset(
    model: nn.Module,
    dataset: EvaluationDataset,
    methods: Mapping[str, Method | tuple[Method, Mapping[str, Any]]],
    out: str | os.PathLike,
    metrics: Sequence[str] = ("pointing_game",),
    *,
    preprocessing: Preprocessing | None = None,
    n_steps: int = 50,
    tolerance: float = 15,
    threshold: float = 0.2,
    difficult_flags: str | os.PathLike | None = None,
    chunk_size: int = 64,
    score: Score = "probability",
    contrast: Literal["second", "last"] = "second",
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    limit: int | None = None,
    description: Mapping[str, Any] | None = None,
    progress: bool = True,
    dpi: int = 100,
) -> MetricsTable | None:
    """Evaluate every method on every (image, class) pair of ``dataset``; resumable, distributable.

    Run it as is for one process, or under ``torchrun --nproc_per_node K [--nnodes M ...]``: each
    process takes every K-th image, appends its rows to its own file in ``out/parts/``, and rank 0
    merges them into ``out/per_example.csv`` (a row per image x class x method x layer, a column
    per metric, sorted by key: the same file whatever the number of processes), ``out/summary.csv``
    (a row per method x layer) and, with deletion, ``out/curves.png``. A rerun into the same
    ``out`` skips the pairs already written there.

    Args:
        model: the classifier, in eval mode, already on ``device`` (under torchrun with CUDA,
            GPU ``LOCAL_RANK``); it is left as it was. Its output ``k`` must be the data set's
            class ``k``.
        dataset: a :class:`~captum_normgrad.evaluation.VOCDataset`, ``COCODataset`` or
            ``ImageFolderDataset`` (the latter has no ground truth: no pointing game or localization).
        methods: display name -> a Captum-style method (``.attribute(inputs, target=...)``) or a
            ``(method, attribute_kwargs)`` pair, as in
            :func:`captum_normgrad.metrics.evaluate_attributions`. A method returning one map per
            layer gives one row per layer. Input methods (``IntegratedGradients``...) must return
            ``(N, 1, H, W)``: wrap them to reduce the channels.
        out: the output folder, shared by all processes.
        metrics: any of ``captum_normgrad.metrics.METRICS``, whose columns it fills:
            ``pointing_game`` (TorchRay's, see :func:`~captum_normgrad.evaluation.pointing_hits`),
            ``localization`` (IoU of the thresholded map's box with the class's boxes, and
            accuracy at IoU >= 0.5), ``deletion`` and ``insertion`` (RISE's curves at the model's
            input, with their areas), ``confidence`` (average drop and increase in confidence)
            and ``selectivity`` (rank correlation with the map for the ``contrast`` class), as in
            :func:`captum_normgrad.metrics.evaluate_attributions`.
        preprocessing: resize / crop / normalisation (default: TorchRay's, shorter side 224, no
            crop, ImageNet statistics).
        n_steps: deletion / insertion steps.
        tolerance: pointing-game tolerance in pixels of the original image.
        threshold: localization threshold, a fraction of the map's range.
        difficult_flags: a TorchRay difficult-subset file; adds ``pointing_game_difficult``.
        chunk_size: perturbed images per forward pass.
        score: ``"probability"``, ``"output"`` or a callable (deletion / insertion, confidence).
        contrast: the other class for selectivity: ``"second"`` (the best-scoring other class) or
            ``"last"`` (the worst-scoring).
        device: where the inputs go (default: CUDA when available; GPU ``LOCAL_RANK`` under
            torchrun).
        num_threads: intra-op threads per process while the run lasts. Per-example results are
            bitwise identical across numbers of processes at the same thread count.
        limit: evaluate only the first ``limit`` images (to try a configuration; a later run
            without it continues).
        description: extra settings recorded in ``out/config.json`` (model, weights, data...): a
            rerun with other settings is refused instead of mixing results.
        progress: a progress bar in images/s on rank 0.
        dpi: resolution of the curves figure.

    Returns:
        The summary table on rank 0, ``None`` on the other ranks.

    Raises:
        ValueError: an unknown metric, ground-truth metrics on a folder data set, an output
            folder holding another configuration's results, a model whose outputs do not match
            the classes, unreadable images or annotations.
    """
    check_metric_names(metrics)
    if not dataset.has_ground_truth and _needs_ground_truth(metrics):
        needing = [name for name in metrics if METRICS[name].needs_ground_truth]
        usable = [name for name in METRICS if not METRICS[name].needs_ground_truth]
        raise ValueError(
            f"{type(dataset).__name__} has no boxes or masks for {', '.join(needing)}: use "
            f"metrics from {usable} only"
        )
    if contrast not in ("second", "last"):
        raise ValueError(f"contrast must be 'second' or 'last', got {contrast!r}")
    if not methods:
        raise ValueError("give at least one method")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    if model.training:
        warnings.warn(
            "the model is in training mode: dropout and batch statistics make the maps and "
            "metrics noisy; call model.eval() first",
            stacklevel=2,
        )
    preprocessing = preprocessing or Preprocessing()
    flags = None
    if difficult_flags is not None:
        if "pointing_game" not in metrics:
            raise ValueError(
                "difficult_flags selects pointing-game pairs: add the pointing_game metric"
            )
        flags = read_difficult_flags(difficult_flags, len(dataset.classes))
    out = Path(out)
    columns = _columns(metrics, flags is not None)
    config = {
        "dataset": type(dataset).__name__,
        "classes": list(dataset.classes),
        "methods": list(methods),
        "metrics": list(metrics),
        "columns": columns,
        "preprocessing": {
            "resize": preprocessing.resize,
            "crop": preprocessing.crop,
            "mean": list(preprocessing.mean),
            "std": list(preprocessing.std),
            "antialias": preprocessing.antialias,
        },
        "n_steps": n_steps if any(METRICS[name].curve for name in metrics) else None,
        "score": score if isinstance(score, str) else repr(score),
        "contrast": contrast if "selectivity" in metrics else None,
        "tolerance": tolerance,
        "threshold": threshold,
        "difficult_flags": None if difficult_flags is None else str(difficult_flags),
        **dict(description or {}),
    }
    options = {
        "preprocessing": preprocessing,
        "tolerance": tolerance,
        "threshold": threshold,
        "n_steps": n_steps,
        "chunk_size": chunk_size,
        "score": score,
        "contrast": contrast,
    }
    count = len(dataset) if limit is None else min(limit, len(dataset))
    with process_group(device) as world, _threads(num_threads):
        check_config(out, config, world.rank)
        store = ResultsStore(out, columns, world.rank)
        done = store.finished_keys()
        barrier(world)  # every process has read what is done before anyone appends
        evaluator = _ImageEvaluator(model, dataset, methods, metrics, options, flags, world)
        indices = shard(count, world)
        bar = tqdm(
            indices,
            desc=f"evaluating (rank 0 of {world.world_size})"
            if world.world_size > 1
            else "evaluating",
            unit="img",
            disable=not (progress and world.is_main),
        )
        for index in bar:
            store.append(evaluator.rows(dataset[index], done))
        barrier(world)
        if not world.is_main:
            return None
        rows = store.merge()
        layer_order = list(dict.fromkeys(sum(evaluator.layer_names.values(), [])))
        table = summarize(rows, columns, list(methods), layer_order)
        table.to_csv(out / "summary.csv")
        save_curves_figure(rows, out / "curves.png", list(methods), layer_order, dpi=dpi)
        return table
