"""Average drop and increase in confidence (Chattopadhyay et al., Grad-CAM++, 2018).

The explanation image keeps each pixel in proportion to the map: ``E = I * L``, with ``L`` the map
upsampled to the image and min-max normalised per example to ``[0, 1]``. If the map covers what the
model needs, the target's score on ``E`` (``O``) stays close to the score on the image (``Y``).

- **Drop** ``max(0, Y - O) / Y``: the fraction of confidence lost. Averaged over a data set, this is
  Grad-CAM++'s "average drop" (there in percent); **lower is better**.
- **Increase** ``1 if O > Y else 0``: averaged, the "increase in confidence" rate; **higher is
  better**.

Both cost ``2 N`` images through the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from captum_normgrad._core.scores import Score, Target, chunked_scores, resolve_labels
from captum_normgrad.combine import normalize_per_example
from captum_normgrad.metrics._checks import check_images, image_maps

__all__ = ["confidence_drop", "confidence_increase", "explanation_scores"]


def explanation_scores(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    maps: Tensor,
    target: Target = None,
    chunk_size: int = 64,
    score: Score = "probability",
) -> tuple[Tensor, Tensor]:
    """The target's score on the images and on the explanation images ``inputs * map``.

    Args:
        forward_func: the model, ``(B, C, H, W) -> (B, num_classes)``, already in ``eval()`` mode.
        inputs: ``(N, C, H, W)`` images.
        maps: ``(N, 1, h, w)`` maps at any resolution (upsampled bilinearly, then min-max normalised
            per example; a constant map becomes all zeros, i.e. it keeps nothing).
        target: an int, one class per example, or ``None`` for the top-1 prediction.
        chunk_size: images per forward pass.
        score: ``"probability"`` (softmax, as Grad-CAM++), ``"output"`` or a callable on outputs.

    Returns:
        ``(Y, O)``: two ``(N,)`` tensors, the scores on the images and on the explanation images.
    """
    inputs = check_images(inputs)
    num_examples = inputs.shape[0]
    weights = normalize_per_example(image_maps(maps, inputs.shape[-2:], num_examples))
    labels = resolve_labels(forward_func, inputs, target, chunk_size)
    explained = inputs * weights.to(inputs.dtype)
    both = torch.cat([inputs, explained])

    def build(indices: Tensor) -> tuple[Tensor, Tensor]:
        return both[indices], labels[indices % num_examples]

    scores = chunked_scores(forward_func, 2 * num_examples, build, score, chunk_size, inputs.device)
    return scores[:num_examples], scores[num_examples:]


def confidence_drop(original: Tensor, explained: Tensor) -> Tensor:
    """Per-example drop in confidence ``max(0, Y - O) / Y``; its mean is the "average drop".

    Args:
        original: ``Y``, the scores on the images (from :func:`explanation_scores`); must be > 0,
            which probabilities are.
        explained: ``O``, the scores on the explanation images.

    Returns:
        ``(N,)`` values in ``[0, 1]`` for probabilities; **lower is better**.
    """
    if original.shape != explained.shape:
        raise ValueError(f"scores of shapes {original.shape} and {explained.shape} do not pair up")
    if (original <= 0).any():
        raise ValueError(
            "the drop in confidence divides by the original score, which must be positive; use "
            "score='probability' (or a positive score) rather than raw logits"
        )
    return torch.relu(original - explained) / original


def confidence_increase(original: Tensor, explained: Tensor) -> Tensor:
    """Per-example increase indicator ``1.0 if O > Y else 0.0``; its mean is the increase rate.

    Args:
        original: ``Y``, the scores on the images (from :func:`explanation_scores`).
        explained: ``O``, the scores on the explanation images.

    Returns:
        ``(N,)`` zeros and ones; **higher is better**.
    """
    if original.shape != explained.shape:
        raise ValueError(f"scores of shapes {original.shape} and {explained.shape} do not pair up")
    return (explained > original).to(original.dtype)
