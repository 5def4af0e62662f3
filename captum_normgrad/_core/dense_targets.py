"""Targets of a dense (segmentation) output ``(N, K, *S)``: one class per location.

A segmenter's training loss is the per-pixel cross-entropy against a mask, so NormGrad's map of a
segmenter is the map of that loss. ``target`` says which mask:

- a mask ``(N, *S)`` of class indices, pixels labelled 255 (VOC's object boundaries) or -100
  (PyTorch's ``ignore_index``) left out: the training loss itself;
- a class (an int, or one per example): the pixels the model predicts as that class, labelled with
  it (the region Captum's segmentation tutorial sums its score over);
- ``None``: the model's own prediction at every pixel (as top-1 is for a classifier).

Each example's loss is the mean over its own labelled pixels (the scale of torchvision's training
loss on one image), never over the batch, so its map does not depend on its batch-mates. An example
left with no labelled pixel would give a map of zeros; it is refused, naming the example.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captum_normgrad._core.front_door import is_index, target_length_error

__all__ = ["IGNORE", "class_scores", "dense_cross_entropy", "dense_labels", "region_scores"]

IGNORE = -100  # F.cross_entropy's ignore_index; 255 in a mask is mapped to it
_IGNORED_IN_MASKS = (255, -100)


def _classes_per_example(outputs: Tensor, target: object) -> Tensor:
    """One class per example from an int, a list or a ``(N,)`` / one-element tensor."""
    num_examples, num_classes = outputs.shape[:2]
    if is_index(target):
        classes = torch.full((num_examples,), int(target), dtype=torch.long)
    else:
        classes = torch.as_tensor(target).long().reshape(-1)
        if classes.numel() == 1:
            classes = classes.expand(num_examples)
        elif classes.numel() != num_examples:
            raise target_length_error(classes.numel(), num_examples)
    classes = classes.to(outputs.device)
    bad = (classes < 0) | (classes >= num_classes)
    if bad.any():
        raise ValueError(
            f"target class {classes[bad][0].item()} is out of range for a segmentation output of "
            f"{num_classes} classes (shape {tuple(outputs.shape)})"
        )
    return classes


def _is_mask(outputs: Tensor, target: object) -> bool:
    return isinstance(target, Tensor) and target.dim() == outputs.dim() - 1 and target.dim() >= 2


def _checked_mask(outputs: Tensor, mask: Tensor) -> Tensor:
    spatial = tuple(outputs.shape[2:])
    if mask.shape[0] != outputs.shape[0] or tuple(mask.shape[1:]) != spatial:
        raise ValueError(
            f"the target mask has shape {tuple(mask.shape)}, but the segmentation output "
            f"{tuple(outputs.shape)} needs (N, *S) = {(outputs.shape[0], *spatial)}: one class "
            "index per output pixel (resize the mask with nearest-neighbour interpolation)"
        )
    labels = mask.to(outputs.device).long()
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    for value in _IGNORED_IN_MASKS:
        ignored |= labels == value
    bad = ~ignored & ((labels < 0) | (labels >= outputs.shape[1]))
    if bad.any():
        raise ValueError(
            f"the target mask holds class {labels[bad][0].item()}, out of range for "
            f"{outputs.shape[1]} classes; label ignored pixels 255 or -100"
        )
    return labels.masked_fill(ignored, IGNORE)


def _refuse_empty(labelled: Tensor, what: str, first_example: int) -> None:
    empty = ~labelled.flatten(1).any(dim=1)
    if empty.any():
        index = first_example + int(empty.nonzero()[0])
        raise ValueError(
            f"example {index} has no {what}: its loss, and so its map, would be zero everywhere. "
            "Explain a class the model predicts in it, or give a mask (N, H, W)"
        )


def dense_labels(outputs: Tensor, target: object, first_example: int = 0) -> Tensor:
    """The per-location labels ``(N, *S)`` of a dense output's cross-entropy (see the module).

    Args:
        outputs: ``(N, K, *S)`` class scores.
        target: a mask ``(N, *S)``, a class (int, list, ``(N,)`` tensor), or ``None``.
        first_example: the batch index of ``outputs[0]``, for messages.

    Raises:
        ValueError: a mask of the wrong size or with out-of-range classes, a class out of range,
            an example with no labelled pixel.
    """
    if target is None:
        return outputs.detach().argmax(dim=1)
    if isinstance(target, tuple):
        raise ValueError(
            f"a segmentation cross-entropy takes a mask (N, *S) or one class per example, got "
            f"target={target!r}; tuple targets select one output value (use loss='output')"
        )
    if _is_mask(outputs, target):
        labels = _checked_mask(outputs, target)
        _refuse_empty(labels != IGNORE, "labelled pixel in the target mask", first_example)
        return labels
    if isinstance(target, Tensor) and target.dim() > 1:
        raise ValueError(
            f"target has shape {tuple(target.shape)}; a segmentation output of shape "
            f"{tuple(outputs.shape)} takes a mask (N, *S) = "
            f"{(outputs.shape[0], *outputs.shape[2:])} or one class per example"
        )
    classes, region = _class_region(outputs, target, first_example)
    return (
        classes.view(-1, *[1] * (region.dim() - 1)).expand_as(region).masked_fill(~region, IGNORE)
    )


def _class_region(outputs: Tensor, target: object, first_example: int) -> tuple[Tensor, Tensor]:
    """Each example's class ``(N,)`` and the pixels it predicts as that class ``(N, *S)``, an
    example predicting it nowhere refused."""
    classes = _classes_per_example(outputs, target)
    predicted = outputs.detach().argmax(dim=1)
    region = predicted == classes.view(-1, *[1] * (predicted.dim() - 1))
    _refuse_empty(region, "pixel predicted as the target class", first_example)
    return classes, region


def class_scores(outputs: Tensor, classes: Tensor) -> Tensor:
    """Each example's scores of its class at every location: ``(N, K, *S)`` -> ``(N, *S)``."""
    return outputs[torch.arange(outputs.shape[0], device=outputs.device), classes]


def region_scores(outputs: Tensor, target: object) -> Tensor:
    """Captum's segmentation-tutorial score: per example, the class's scores summed over the
    pixels the model predicts as that class, ``(N,)``."""
    classes, region = _class_region(outputs, target, 0)
    return (class_scores(outputs, classes) * region).flatten(1).sum(dim=1)


def dense_cross_entropy(outputs: Tensor, labels: Tensor) -> Tensor:
    """Per example, the mean per-pixel cross-entropy over its labelled pixels, ``(N,)`` (labels
    validated by :func:`dense_labels`; no data-dependent branch, so it runs under torch.func)."""
    pixels = torch.nn.functional.cross_entropy(
        outputs, labels, reduction="none", ignore_index=IGNORE
    )
    labelled = (labels != IGNORE).flatten(1).sum(dim=1)
    return pixels.flatten(1).sum(dim=1) / labelled
