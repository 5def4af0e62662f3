"""Model-randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

A map that explains the model must change when the model's learned weights are destroyed. The check
re-initialises layers of a *deep copy* of the model, from the top (logits) down, recomputes the map
after each step, and measures how alike it still is to the original map:

- **cascading** (default): the layers are randomised cumulatively, top-down;
- **independent**: each layer alone is randomised in a fresh copy.

Similarity is the Spearman rank correlation and SSIM, each on the signed map and on its absolute
value, per example. **Lower is better** (the map depends on the weights); a map that stays near 1
(an edge detector, the input itself) fails the check. The user's model is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from captum_normgrad._core.methods import Method, call_method
from captum_normgrad.metrics._checks import check_images, image_maps
from captum_normgrad.metrics.similarity import map_ssim, spearman_correlation

__all__ = ["RandomizationResult", "model_randomization", "randomizable_layers"]


@dataclass(frozen=True)
class RandomizationResult:
    """Similarity to the original map after each randomisation step.

    Attributes:
        layers: the layer randomised at each step (cascading: together with all before it).
        spearman: ``(steps, N)`` rank correlation of the signed maps.
        spearman_abs: ``(steps, N)`` rank correlation of the absolute maps.
        ssim: ``(steps, N)`` SSIM of the signed maps (each min-max normalised).
        ssim_abs: ``(steps, N)`` SSIM of the absolute maps.
    """

    layers: list[str]
    spearman: Tensor
    spearman_abs: Tensor
    ssim: Tensor
    ssim_abs: Tensor


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def randomizable_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters and can re-initialise them, top (last) first.

    "Top" follows registration order, which is the forward order in torchvision's models; pass
    ``layers=`` to :func:`model_randomization` where it is not.
    """
    names = [
        name
        for name, module in model.named_modules()
        if name and _owns_parameters(module) and hasattr(module, "reset_parameters")
    ]
    return names[::-1]


def _randomize(module: nn.Module, name: str, seed: int) -> None:
    owners = [m for m in module.modules() if _owns_parameters(m)]
    if not owners:
        raise ValueError(f"layer '{name}' has no parameters to randomise")
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for owner in owners:
            if not hasattr(owner, "reset_parameters"):
                raise TypeError(
                    f"layer '{name}' contains a {type(owner).__name__} without reset_parameters(); "
                    "the check re-initialises layers with their own initialiser"
                )
            owner.reset_parameters()


def _image_maps(
    make_method: Callable[[nn.Module], Method],
    model: nn.Module,
    inputs: Tensor,
    target: Any,
    kwargs: Mapping[str, Any] | None,
) -> Tensor:
    maps = call_method(make_method(model), inputs, target, kwargs)
    if len(maps) != 1:
        raise ValueError(
            f"the method returned {len(maps)} maps; the sanity check compares one map per example "
            "(build the method for one layer)"
        )
    return image_maps(maps[0], inputs.shape[-2:], inputs.shape[0])


def model_randomization(
    model: nn.Module,
    make_method: Callable[[nn.Module], Method],
    inputs: Tensor,
    target: Any = None,
    *,
    layers: Sequence[str] | None = None,
    cascading: bool = True,
    seed: int = 0,
    attribute_kwargs: Mapping[str, Any] | None = None,
) -> RandomizationResult:
    """Randomise the model layer by layer and compare each new map with the original.

    Args:
        model: the trained model; it is deep-copied, never modified.
        make_method: builds the method on a model, e.g.
            ``lambda m: LayerNormGrad(m, m.layer4)``; it is called on each copy, so the layer
            must be looked up on the model it is given.
        inputs: ``(N, C, H, W)`` images. Maps are upsampled to ``(H, W)`` before comparing.
        target: passed to the method. ``None`` becomes the *original* model's top-1 prediction (when
            it outputs ``(N, num_classes)``), so every step explains the same class.
        layers: names (as in ``model.named_modules()``) in the order to randomise, top first;
            default :func:`randomizable_layers`. Each is re-initialised with its own
            ``reset_parameters()`` (PyTorch's default initialisation), as in Quantus.
        cascading: cumulative top-down randomisation, or each layer independently.
        seed: the random stream for the new weights; step ``i`` draws from ``seed + i`` in both
            modes, so a layer gets the same new weights either way.
        attribute_kwargs: extra keyword arguments for ``attribute``.

    Returns:
        A :class:`RandomizationResult`, one row per layer.

    Raises:
        ValueError: an unknown layer name, a layer without parameters, a method returning several
            maps, or bad inputs.
    """
    inputs = check_images(inputs)
    named = dict(model.named_modules())
    layers = randomizable_layers(model) if layers is None else list(layers)
    unknown = [name for name in layers if name not in named or not name]
    if unknown or not layers:
        raise ValueError(f"no such layers in the model: {unknown or 'none given'}")
    reference = copy.deepcopy(model)
    if target is None:
        with torch.no_grad():
            outputs = reference(inputs)
        if isinstance(outputs, Tensor) and outputs.dim() == 2:
            target = outputs.argmax(dim=1)
    original = _image_maps(make_method, reference, inputs, target, attribute_kwargs)
    del reference
    similarities: dict[str, list[Tensor]] = {"signed": [], "abs": [], "ssim": [], "ssim_abs": []}
    randomized = copy.deepcopy(model) if cascading else None
    for step, name in enumerate(layers):
        if not cascading:
            randomized = copy.deepcopy(model)
        _randomize(dict(randomized.named_modules())[name], name, seed + step)
        current = _image_maps(make_method, randomized, inputs, target, attribute_kwargs)
        similarities["signed"].append(spearman_correlation(original, current))
        similarities["abs"].append(spearman_correlation(original.abs(), current.abs()))
        similarities["ssim"].append(map_ssim(original, current))
        similarities["ssim_abs"].append(map_ssim(original.abs(), current.abs()))
    return RandomizationResult(
        layers=layers,
        spearman=torch.stack(similarities["signed"]),
        spearman_abs=torch.stack(similarities["abs"]),
        ssim=torch.stack(similarities["ssim"]),
        ssim_abs=torch.stack(similarities["ssim_abs"]),
    )
