"""The model's score for each example's target class, computed in chunks without touching the model.

Faithfulness metrics run the model on many perturbed copies of each image. They all go through
:func:`chunked_scores`: ``chunk_size`` images per forward pass, built on the fly so memory stays at
one chunk, under ``torch.no_grad()``, with the model's buffers (BatchNorm statistics in train mode)
restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from captum_normgrad._core.dense_targets import class_scores
from captum_normgrad._core.front_door import explained_output
from captum_normgrad._core.model_state import models_behind, preserved_buffers

__all__ = ["Score", "Target", "chunked_scores", "resolve_labels"]

Score = Literal["probability", "output"] | Callable[[Tensor], Tensor]
"""How outputs become the score a metric tracks: ``"probability"`` (softmax over classes, as RISE
and Grad-CAM++), ``"output"`` (the raw output, e.g. a logit) or a callable ``(B, K) -> (B, K)``
(e.g. ``torch.sigmoid`` for multi-label models). A segmenter's ``(B, K, *S)`` scores (or the
``"out"`` of torchvision's dict) are scored per pixel the same way, then averaged over the image's
pixels: the class's mean probability over the image."""

Target = int | list[int] | Tensor | None
"""The class each example is scored for: one index for all, one per example, or ``None`` for the
model's top-1 prediction on the unperturbed image."""


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _target_scores(outputs: object, labels: Tensor, score: Score) -> Tensor:
    outputs = explained_output(outputs)
    if outputs.dim() < 2:
        raise ValueError(
            "the model must return (B, num_classes) scores (or (B, K, H, W) segmentation scores), "
            f"got {tuple(outputs.shape)}"
        )
    bad = (labels < 0) | (labels >= outputs.shape[1])
    if bad.any():
        raise ValueError(
            f"target class {labels[bad][0].item()} is out of range for {outputs.shape[1]} outputs"
        )
    if score == "probability":
        outputs = outputs.softmax(dim=1)
    elif callable(score):
        outputs = score(outputs)
    elif score != "output":
        raise ValueError(f"score must be 'probability', 'output' or a callable, got {score!r}")
    if outputs.dim() == 2:
        return outputs.gather(1, labels[:, None])[:, 0]
    return class_scores(outputs, labels).flatten(1).mean(dim=1)  # a segmenter: over its pixels


def chunked_scores(
    forward_func: Callable[[Tensor], Tensor],
    total: int,
    build: Callable[[Tensor], tuple[Tensor, Tensor]],
    score: Score,
    chunk_size: int,
    device: torch.device,
) -> Tensor:
    """Score ``total`` images, ``chunk_size`` per forward pass.

    Args:
        forward_func: the model.
        total: how many images there are.
        build: ``indices -> (images, labels)`` for a chunk of image indices.
        score: see :data:`Score`.
        chunk_size: images per forward pass.
        device: where the indices live (the images' device).

    Returns:
        ``(total,)`` scores, in the dtype of the model's outputs.
    """
    _check_positive_int(chunk_size, "chunk_size")
    pieces = []
    with torch.no_grad(), preserved_buffers(models_behind(forward_func, [])):
        for start in range(0, total, chunk_size):
            indices = torch.arange(start, min(start + chunk_size, total), device=device)
            images, labels = build(indices)
            pieces.append(_target_scores(forward_func(images), labels, score))
    return torch.cat(pieces)


def _top1(outputs: Tensor) -> Tensor:
    if outputs.dim() > 2:
        raise ValueError(
            f"target=None takes each image's top-1 class, but a segmenter's output "
            f"{tuple(outputs.shape)} has one per pixel; give the class to score (target=c)"
        )
    return outputs.argmax(dim=1)


def resolve_labels(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    target: Target,
    chunk_size: int,
) -> Tensor:
    """One class index per example: ``target`` validated, or the top-1 prediction when ``None``.

    The range against the number of classes is checked when the scores are selected.
    """
    num_examples = inputs.shape[0]
    if target is None:
        _check_positive_int(chunk_size, "chunk_size")
        with torch.no_grad(), preserved_buffers(models_behind(forward_func, [])):
            return torch.cat(
                [
                    _top1(explained_output(forward_func(inputs[start : start + chunk_size])))
                    for start in range(0, num_examples, chunk_size)
                ]
            )
    if isinstance(target, bool) or isinstance(target, (tuple, float)):
        raise ValueError(f"target must be a class index or one per example, got {target!r}")
    labels = torch.as_tensor(target, device=inputs.device)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {labels.dtype}")
    labels = labels.long().reshape(-1)
    if labels.numel() == 1:
        return labels.expand(num_examples)
    if labels.numel() != num_examples:
        raise ValueError(
            f"target has {labels.numel()} entries for a batch of {num_examples} examples"
        )
    return labels
