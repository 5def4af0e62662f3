"""Captum's own metrics on layer maps: ``captum.metrics.infidelity`` and ``sensitivity_max``.

Both expect attributions shaped like the inputs, ``(N, C, H, W)``; ``sensitivity_max`` also calls
the explanation function on a *tuple* of inputs and expects a tuple back. NormGrad and
``LayerGradCam`` return ``(N, 1, h, w)`` maps at a layer's resolution. The adapter upsamples a map
to the image (bilinear, as every metric here) and repeats it over the channels, so a pixel's
importance applies to all of its channels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from captum_normgrad._core.methods import Method, call_method
from captum_normgrad.metrics._checks import check_images, image_maps

__all__ = ["input_shaped_explanation", "to_input_shape"]


def to_input_shape(maps: Tensor, inputs: Tensor) -> Tensor:
    """Upsample ``(N, 1, h, w)`` maps to the images and repeat them over the channels.

    Args:
        maps: ``(N, 1, h, w)`` maps.
        inputs: the ``(N, C, H, W)`` images they explain.

    Returns:
        A contiguous ``(N, C, H, W)`` tensor, ready for ``captum.metrics.infidelity``.

    Example:
        >>> from captum.metrics import infidelity
        >>> maps = LayerNormGrad(model, model.layer4).attribute(images, target=labels)
        >>> def perturb(inputs):
        ...     noise = 0.1 * torch.randn_like(inputs)
        ...     return noise, inputs - noise
        >>> infidelity(model, perturb, images, to_input_shape(maps, images), target=labels)
    """
    inputs = check_images(inputs)
    upsampled = image_maps(maps, inputs.shape[-2:], inputs.shape[0]).to(inputs.dtype)
    return upsampled.expand(-1, inputs.shape[1], -1, -1).contiguous()


def input_shaped_explanation(
    method: Method, layer_index: int | None = None
) -> Callable[..., tuple[Tensor, ...]]:
    """Wrap a method so ``captum.metrics.sensitivity_max`` can call it.

    Args:
        method: a Captum-style method (``.attribute``) or callable returning ``(N, 1, h, w)`` maps.
        layer_index: which map to use when the method returns one per layer; required then.

    Returns:
        ``explain(inputs, **kwargs) -> (maps_at_input_shape,)``, accepting a tensor or the 1-tuple
        ``sensitivity_max`` passes; ``kwargs`` (``target``, ...) go to the method.

    Example:
        >>> from captum.metrics import sensitivity_max
        >>> explain = input_shaped_explanation(LayerNormGrad(model, model.layer4))
        >>> sensitivity_max(explain, images, target=labels)
    """

    def explain(inputs: Tensor | tuple[Tensor, ...], **kwargs: Any) -> tuple[Tensor, ...]:
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise ValueError(f"expected one input tensor (images), got {len(inputs)}")
            (inputs,) = inputs
        target = kwargs.pop("target", None)
        maps = call_method(method, inputs, target, kwargs)
        if len(maps) > 1 and layer_index is None:
            raise ValueError(
                f"the method returned {len(maps)} maps (one per layer); pick one with layer_index"
            )
        index = 0 if layer_index is None else layer_index
        if not 0 <= index < len(maps):
            raise ValueError(f"layer_index {index} is out of range for {len(maps)} maps")
        return (to_input_shape(maps[index], inputs),)

    return explain
