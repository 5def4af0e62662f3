"""What NormGrad backpropagates: the per-example loss built from the model's outputs and ``target``.

NormGrad asks which locations contribute to the *training* gradient, so by default it backpropagates
the training loss: the cross-entropy of ``target`` taken as the label. Per-example losses are summed,
never averaged, so that an example's map does not depend on the batch it is in.

Three choices, named by the ``loss`` argument of every method:

- ``"cross_entropy"`` (default, the paper): ``outputs`` are ``(N, num_classes)`` logits and ``target``
  gives one class index per example. ``target=None`` uses the model's top-1 prediction as the label.
  A segmenter's ``(N, K, *S)`` output (or the ``"out"`` entry of torchvision's dict) takes the
  per-pixel cross-entropy, each example's the mean over its labelled pixels: ``target`` a mask
  ``(N, *S)`` (255 and -100 ignored), a class (the pixels predicted as it) or ``None`` (the model's
  own prediction everywhere). An example left with no labelled pixel is refused, naming it.
- ``"output"`` (Captum's convention, as ``LayerGradCam``): backpropagate the selected output itself,
  ``target`` in any form Captum accepts. On a segmenter's output a class (one per example or one
  for all) gives Captum's segmentation-tutorial score: the class's scores summed over the pixels
  predicted as it.
- a callable ``loss(outputs, target) -> (N,)`` per-example losses, for regression or detection
  heads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_normgrad._core.captum import TargetType, select_targets
from captum_normgrad._core.dense_targets import dense_cross_entropy, dense_labels, region_scores
from captum_normgrad._core.front_door import (
    check_loss,
    check_target_form,
    explained_output,
    is_index,
    target_length_error,
)

__all__ = ["LossSpec", "check_target_form", "class_labels", "per_example_loss"]

LossSpec = Literal["cross_entropy", "output"] | Callable[[Tensor, TargetType], Tensor]


def loss_labels(outputs: Tensor, target: TargetType, first_example: int = 0) -> Tensor:
    """The labels of the methods' cross-entropy: :func:`class_labels` for ``(N, num_classes)``
    logits, one label per location ``(N, *S)`` (ignored pixels -100) for a segmenter's
    ``(N, K, *S)`` scores (see the module docstring).

    Args:
        first_example: the batch index of ``outputs[0]``, for messages.
    """
    if outputs.dim() > 2:
        check_target_form(target)
        return dense_labels(outputs, target, first_example)
    return class_labels(outputs, target)


def class_labels(outputs: Tensor, target: TargetType) -> Tensor:
    """One class index per example, validated against ``outputs`` of shape ``(N, num_classes)``.

    Args:
        outputs: the model's logits, ``(N, num_classes)``.
        target: ``None`` (use the top-1 prediction), an ``int``, a one-element tensor, or a list /
            1-D tensor with one class index per example.

    Returns:
        A ``(N,)`` ``long`` tensor on ``outputs.device``.

    Raises:
        ValueError: ``outputs`` is not 2-D, or ``target`` has the wrong form, length or range.
    """
    if outputs.dim() != 2:
        raise ValueError(
            "cross-entropy needs (N, num_classes) logits, but the model returned an output of shape "
            f"{tuple(outputs.shape)}; pass loss='output' (Captum's convention) or a callable "
            "loss(outputs, target) -> per-example losses"
        )
    check_target_form(target)
    num_examples, num_classes = outputs.shape
    if target is None:
        return outputs.detach().argmax(dim=1)
    if isinstance(target, bool) or isinstance(target, tuple):
        raise ValueError(
            f"cross-entropy needs one class index per example, got target={target!r}; "
            "tuple targets index multi-dimensional outputs (use loss='output')"
        )
    if is_index(target):
        labels = torch.full((num_examples,), target, dtype=torch.long, device=outputs.device)
    else:
        labels = torch.as_tensor(target, device=outputs.device).long()
        if labels.numel() == 1:
            labels = labels.reshape(1).expand(num_examples)
        elif labels.dim() != 1:
            raise ValueError(
                f"target has shape {tuple(labels.shape)}; cross-entropy needs one class index per "
                "example (a list or a 1-D tensor) or a single index"
            )
        elif labels.numel() != num_examples:
            raise target_length_error(labels.numel(), num_examples)
    out_of_range = (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        bad = labels[out_of_range][0].item()
        raise ValueError(f"target class {bad} is out of range for {num_classes} output classes")
    return labels


def cross_entropy_of_labels(outputs: Tensor, labels: Tensor) -> Tensor:
    """The per-example cross-entropy ``(N,)`` of labels from :func:`loss_labels` (no check of its
    own: it runs inside order 1's passes, under torch.func too)."""
    if outputs.dim() > 2:
        return dense_cross_entropy(outputs, labels)
    return F.cross_entropy(outputs, labels, reduction="none")


def _is_class_target(target: TargetType) -> bool:
    if is_index(target):
        return True
    if isinstance(target, list):
        return all(is_index(entry) for entry in target)
    return isinstance(target, Tensor) and target.dim() <= 1


def _selected_outputs(outputs: Tensor, target: TargetType) -> Tensor:
    """Captum's target selection, with its assertions turned into messages that name the problem;
    on a segmenter's output a class selects Captum's segmentation-tutorial score."""
    num_examples = outputs.shape[0]
    if outputs.dim() > 2 and _is_class_target(target):
        return region_scores(outputs, target)
    if (
        isinstance(target, int)
        and outputs.dim() >= 2
        and not -outputs.shape[-1] <= target < outputs.shape[-1]
    ):
        raise ValueError(
            f"target {target} is out of range for an output of shape {tuple(outputs.shape)}"
        )
    if isinstance(target, (list, Tensor)) and not (
        isinstance(target, Tensor) and target.numel() == 1
    ):
        if len(target) != num_examples:
            raise target_length_error(len(target), num_examples)
        if outputs.dim() == 2 and not isinstance(target[0], tuple):
            labels = torch.as_tensor(target)
            if ((labels < 0) | (labels >= outputs.shape[1])).any():
                raise ValueError(
                    f"a target index in {labels.tolist()} is out of range for an output of shape "
                    f"{tuple(outputs.shape)}"
                )
    try:
        selected = select_targets(outputs, target)
    except (AssertionError, IndexError) as error:
        raise ValueError(
            f"target {target!r} cannot select from an output of shape {tuple(outputs.shape)}: {error}"
        ) from error
    if selected.dim() == 2 and selected.shape[1] == 1:
        selected = selected[:, 0]
    if selected.shape != (num_examples,):
        raise ValueError(
            f"loss='output' needs one value per example after selecting target {target!r}, got shape "
            f"{tuple(selected.shape)} from outputs of shape {tuple(outputs.shape)}; give a target"
        )
    return selected


def per_example_loss(outputs: Tensor, target: TargetType, loss: LossSpec) -> Tensor:
    """The ``(N,)`` per-example quantity NormGrad backpropagates (see the module docstring).

    Args:
        outputs: what the forward function returned.
        target: as for Captum's attribution methods.
        loss: ``"cross_entropy"``, ``"output"`` or a callable ``loss(outputs, target) -> (N,)``.

    Returns:
        A ``(N,)`` tensor; its sum is backpropagated.

    Raises:
        ValueError: the outputs, target or loss do not fit together.
    """
    outputs = explained_output(outputs)
    if loss == "cross_entropy":
        if not outputs.is_floating_point():
            raise ValueError(
                f"cross-entropy needs floating-point logits, got dtype {outputs.dtype}"
            )
        return cross_entropy_of_labels(outputs, loss_labels(outputs, target))
    if loss == "output":
        check_target_form(target)
        return _selected_outputs(outputs, target)
    check_loss(loss)  # a callable from here on
    losses = loss(outputs, target)
    if not isinstance(losses, Tensor) or losses.shape != (outputs.shape[0],):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"the loss callable must return one loss per example, shape ({outputs.shape[0]},); "
            f"it returned {shape}"
        )
    return losses
