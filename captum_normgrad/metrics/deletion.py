"""Deletion and insertion (Petsiuk et al., RISE, 2018): does the map order pixels by how much the
model's score depends on them?

*Deletion* replaces the image's pixels by a substrate (zeros, a blur, the mean colour), most salient
first, and records the target's score after each step: a faithful map makes it fall fast, so a
**lower** area under the curve is better. *Insertion* starts from the substrate and puts the image's
pixels back, most salient first: the score should rise fast, so a **higher** area is better.

Batched: the ``N * (n_steps + 1)`` perturbed images are built on the fly, ``chunk_size`` per forward
pass, from each pixel's rank in its map, so memory never holds more than one chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

from captum_normgrad._core.scores import Score, Target, chunked_scores, resolve_labels
from captum_normgrad.metrics._checks import check_images, image_maps

__all__ = [
    "area_under_curve",
    "deletion_auc",
    "deletion_curve",
    "insertion_auc",
    "insertion_curve",
    "substrate_images",
]

Substrate = Literal["zeros", "blur", "mean"] | Tensor

# RISE's blur: an 11x11 Gaussian kernel with sigma 5.
_BLUR_KERNEL = 11
_BLUR_SIGMA = 5.0


def substrate_images(inputs: Tensor, substrate: Substrate) -> Tensor:
    """What a removed pixel becomes.

    Args:
        inputs: ``(N, C, H, W)`` images, in the model's input space.
        substrate: ``"zeros"`` (zero in the model's input space: for normalised images, the data
            set's mean colour), ``"blur"`` (RISE's Gaussian blur, kernel 11, sigma 5: removes
            detail while keeping colours), ``"mean"`` (each image's own mean colour per channel),
            or a tensor broadcastable to ``inputs`` (e.g. a baseline image).

    Returns:
        ``(N, C, H, W)`` substrate images.
    """
    if isinstance(substrate, Tensor):
        try:
            return torch.broadcast_to(substrate.to(inputs), inputs.shape)
        except RuntimeError as error:
            raise ValueError(
                f"a substrate tensor of shape {tuple(substrate.shape)} does not broadcast to the "
                f"images' shape {tuple(inputs.shape)}"
            ) from error
    if substrate == "zeros":
        return torch.zeros_like(inputs)
    if substrate == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    if substrate == "blur":
        if min(inputs.shape[-2:]) <= _BLUR_KERNEL // 2:
            raise ValueError(
                f"the blur substrate needs images larger than {_BLUR_KERNEL // 2} pixels per side, "
                f"got {tuple(inputs.shape[-2:])}"
            )
        return gaussian_blur(inputs, [_BLUR_KERNEL] * 2, [_BLUR_SIGMA] * 2)
    raise ValueError(f"substrate must be 'zeros', 'blur', 'mean' or a tensor, got {substrate!r}")


def area_under_curve(curves: Tensor) -> Tensor:
    """Trapezoidal area under ``(N, n_steps + 1)`` curves sampled at fractions ``0, 1/n, ..., 1``.

    Returns:
        ``(N,)`` areas, in the units of the score (a probability curve gives an area in ``[0, 1]``).
    """
    if curves.dim() != 2 or curves.shape[1] < 2:
        raise ValueError(f"curves must be (N, n_steps + 1) with n_steps >= 1, got {curves.shape}")
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), dim=1)


def _pixel_ranks(maps: Tensor) -> Tensor:
    """Each pixel's position when sorted by decreasing saliency; ties keep raster order."""
    flat = maps.flatten(1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _causal_curve(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    maps: Tensor,
    target: Target,
    n_steps: int,
    substrate: Substrate,
    chunk_size: int,
    score: Score,
    inserting: bool,
) -> Tensor:
    inputs = check_images(inputs)
    num_examples, _, height, width = inputs.shape
    maps = image_maps(maps, (height, width), num_examples)
    pixels = height * width
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or not 1 <= n_steps <= pixels:
        raise ValueError(f"n_steps must be an int in [1, {pixels}] (pixels), got {n_steps!r}")
    labels = resolve_labels(forward_func, inputs, target, chunk_size)
    ranks = _pixel_ranks(maps)
    # After step k, the first floor(k * pixels / n_steps) pixels in the ranking have changed.
    changed_counts = torch.arange(n_steps + 1, device=inputs.device) * pixels // n_steps
    substrate = substrate_images(inputs, substrate)
    start, end = (substrate, inputs) if inserting else (inputs, substrate)

    def build(indices: Tensor) -> tuple[Tensor, Tensor]:
        example, step = indices // (n_steps + 1), indices % (n_steps + 1)
        changed = ranks[example] < changed_counts[step, None]
        changed = changed.view(-1, 1, height, width)
        return torch.where(changed, end[example], start[example]), labels[example]

    total = num_examples * (n_steps + 1)
    scores = chunked_scores(forward_func, total, build, score, chunk_size, inputs.device)
    return scores.view(num_examples, n_steps + 1)


_ARGS_DOC = """
    Args:
        forward_func: the model, ``(B, C, H, W) -> (B, num_classes)``, or a segmenter's
            ``(B, K, H, W)`` (or ``{"out": ...}``), scored by the class's mean over the pixels.
            Its buffers are restored afterwards; put it in ``eval()`` mode yourself (dropout would
            make the curve random).
        inputs: ``(N, C, H, W)`` images.
        maps: ``(N, 1, h, w)`` maps, at the image's or a layer's resolution (upsampled bilinearly).
            Ties are broken in raster order.
        target: the class to track per example: an int, one per example, or ``None`` for the
            model's top-1 prediction on the unperturbed image (``N`` extra forward passes; a
            segmenter needs the class).
        n_steps: the curve has ``n_steps + 1`` points; step ``k`` has changed
            ``floor(k * H * W / n_steps)`` pixels.
        substrate: what removed pixels become (see :func:`substrate_images`).
        chunk_size: perturbed images per forward pass (memory vs speed).
        score: ``"probability"`` (softmax, as RISE), ``"output"`` (raw) or a callable on outputs.
"""


def deletion_curve(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    maps: Tensor,
    target: Target = None,
    n_steps: int = 50,
    substrate: Substrate = "zeros",
    chunk_size: int = 64,
    score: Score = "probability",
) -> Tensor:
    """The target's score as the most salient pixels are replaced by the substrate.

    Returns:
        ``(N, n_steps + 1)``: the score at step 0 (the image) through step ``n_steps`` (all
        substrate). Costs ``N * (n_steps + 1)`` images through the model.
    """
    return _causal_curve(
        forward_func, inputs, maps, target, n_steps, substrate, chunk_size, score, False
    )


def insertion_curve(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    maps: Tensor,
    target: Target = None,
    n_steps: int = 50,
    substrate: Substrate = "blur",
    chunk_size: int = 64,
    score: Score = "probability",
) -> Tensor:
    """The target's score as the image's pixels are put back on the substrate, most salient first.

    Returns:
        ``(N, n_steps + 1)``: the score at step 0 (all substrate) through step ``n_steps`` (the
        image). Costs ``N * (n_steps + 1)`` images through the model.
    """
    return _causal_curve(
        forward_func, inputs, maps, target, n_steps, substrate, chunk_size, score, True
    )


def deletion_auc(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    maps: Tensor,
    target: Target = None,
    n_steps: int = 50,
    substrate: Substrate = "zeros",
    chunk_size: int = 64,
    score: Score = "probability",
) -> Tensor:
    """Area under the deletion curve: **lower is better** (the score falls fast).

    Returns:
        ``(N,)`` areas (see :func:`area_under_curve`) of :func:`deletion_curve`.
    """
    curves = deletion_curve(
        forward_func, inputs, maps, target, n_steps, substrate, chunk_size, score
    )
    return area_under_curve(curves)


def insertion_auc(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    maps: Tensor,
    target: Target = None,
    n_steps: int = 50,
    substrate: Substrate = "blur",
    chunk_size: int = 64,
    score: Score = "probability",
) -> Tensor:
    """Area under the insertion curve: **higher is better** (the score rises fast).

    Returns:
        ``(N,)`` areas (see :func:`area_under_curve`) of :func:`insertion_curve`.
    """
    curves = insertion_curve(
        forward_func, inputs, maps, target, n_steps, substrate, chunk_size, score
    )
    return area_under_curve(curves)


_RETURNS = "\n\n    Returns:"
for _function in (deletion_curve, insertion_curve, deletion_auc, insertion_auc):
    if _RETURNS not in _function.__doc__:
        raise AssertionError(f"{_function.__name__}'s docstring has no Returns section")
    _function.__doc__ = _function.__doc__.replace(_RETURNS, "\n" + _ARGS_DOC + _RETURNS[1:], 1)
