"""Saliency maps computed inside the training forward pass, differentiable in the weights.

A saliency penalty needs the map of each training example as a function of the parameters, so the
map is built from the same forward pass that gives the logits and its gradients are taken with
``create_graph=True``. Each method here is a small subclass overriding one step, :meth:`_maps`, of
the template :meth:`DifferentiableSaliency.__call__` (one forward pass, the layer's activation
captured). The maps explain ``classes``, by default the model's own prediction, because that is the
map a user would be shown.

- :class:`DifferentiableGradCam` (Selvaraju et al.): ``ReLU(sum_k alpha_k A_k)`` with
  ``alpha_k`` the spatial mean of ``d y_c / d A_k`` (``y_c`` the class logit), as Captum's
  ``LayerGradCam(..., relu_attributions=True)``; ``(N, 1, h, w)`` at the layer's resolution.
- :class:`DifferentiableGuidedGradCam`: the Grad-CAM map upsampled (bilinearly) to the input, times
  the guided-backpropagation gradient of ``y_c`` with respect to the input, as Captum's
  ``GuidedGradCam``; ``(N, C, H, W)`` like the input, signed.
- :class:`DifferentiableNormGrad`: order-0 NormGrad ``||A_u|| * ||g_u||`` with ``g`` the gradient of
  the cross-entropy of ``classes`` (summed over the batch), as ``LayerNormGrad``; ``(N, 1, h, w)``.
  NormGrad highlights what drives training, not only the class evidence, so it is less class
  selective than Grad-CAM.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution
from torch import Tensor, nn

from captum_normgrad._core.capture import (
    LayerRecord,
    capture_layers,
    check_each_ran_once,
    layer_gradients,
)
from captum_normgrad._core.front_door import (
    check_grad_mode,
    check_target,
    checked_inputs,
    explained_output,
)
from captum_normgrad._core.layer_map import channel_norm, laid_out
from captum_normgrad._core.layouts import ReshapeTransform, recording_grids, resolve_layouts
from captum_normgrad._core.pause import monitor_paused
from captum_normgrad.losses import class_labels
from captum_normgrad.training.guided import GuidedSwitch, guided_relus

__all__ = [
    "DifferentiableGradCam",
    "DifferentiableGuidedGradCam",
    "DifferentiableNormGrad",
    "DifferentiableSaliency",
    "SaliencyForward",
]


@dataclass
class SaliencyForward:
    """One forward pass with its maps.

    Attributes:
        outputs: the model's ``(N, num_classes)`` logits, part of the graph.
        maps: the maps of ``classes``, part of the graph (``create_graph=True``).
        classes: the ``(N,)`` class each map explains.
    """

    outputs: Tensor
    maps: Tensor
    classes: Tensor


class DifferentiableSaliency:
    """Template: run the model once, capture ``layer``, and compute the maps differentiably.

    The inputs, the classes, the model's output and the layer's layout go through the same checks
    as every ``LayerNormGrad`` method (a token layer of a ViT is laid out on its patch grid, a
    layout that cannot be known is refused), so the maps are those methods' maps.

    Args:
        model: the classifier, returning ``(N, num_classes)`` logits (or an output with
            ``.logits``) from one image batch.
        layer: the module whose output the map is built from (it must run once per forward).
        reshape_transform: as for :class:`~captum_normgrad.LayerNormGrad`.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        reshape_transform: ReshapeTransform | None = None,
    ) -> None:
        if not isinstance(model, nn.Module) or not isinstance(layer, nn.Module):
            raise TypeError("model and layer must be nn.Modules")
        if not any(module is layer for module in model.modules()):
            raise ValueError(f"{type(layer).__name__} layer is not a submodule of the model")
        self.model = model
        self.layer = layer
        (self.layout,) = resolve_layouts(model, [layer], reshape_transform)

    def __call__(self, inputs: Tensor, classes: Tensor | None = None) -> SaliencyForward:
        """Forward ``inputs`` once and return the logits with the maps of ``classes``.

        Args:
            inputs: an image batch ``(N, C, H, W)`` (or a tuple of tensors the model takes).
            classes: ``(N,)`` class indices to explain; ``None`` explains the prediction.

        Returns:
            A :class:`SaliencyForward`; backpropagating anything built from its maps trains the
            weights through the map (double backpropagation).
        """
        check_grad_mode()
        inputs = checked_inputs(inputs)
        check_target(classes, inputs[0].shape[0])
        inputs = tuple(self._prepare_inputs(x) for x in inputs)
        with (
            torch.enable_grad(),
            recording_grids([self.layout]),
            capture_layers(self.model, [self.layer], at_input=False) as records,
            self._hooks() as guide,
        ):
            outputs = explained_output(self.model(*inputs))
            records.end_forward()
            check_each_ran_once(records)
            labels = class_labels(outputs, classes)
            # The map's own gradients are not the training loss's: keep them out of any monitor.
            with monitor_paused():
                maps = self._maps(records[0], outputs, labels, inputs[0], guide)
        return SaliencyForward(outputs, maps, labels)

    def _laid_out(self, record: LayerRecord, score: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's activation and ``d score / d activation`` (with ``create_graph``), channels
        first by the layer's layout, or a refusal naming the layer."""
        layer_gradients(score, [record], create_graph=True, retain_graph=True)
        return laid_out(self.layout, record.activation, record.gradient)

    def _prepare_inputs(self, inputs: Tensor) -> Tensor:
        """The inputs as the forward pass sees them (a variant may need their gradient)."""
        return inputs

    def _hooks(self) -> AbstractContextManager[GuidedSwitch | None]:
        """Hooks a variant needs around the forward pass (none by default)."""
        return nullcontext()

    def _maps(
        self,
        record: LayerRecord,
        outputs: Tensor,
        classes: Tensor,
        inputs: Tensor,
        guide: GuidedSwitch | None,
    ) -> Tensor:
        """The one step a variant overrides: the maps of ``classes``, with ``create_graph``."""
        raise NotImplementedError


def _class_scores(outputs: Tensor, classes: Tensor) -> Tensor:
    return outputs.gather(1, classes[:, None]).sum()


class DifferentiableGradCam(DifferentiableSaliency):
    """Grad-CAM at ``layer`` for ``classes``, differentiable in the weights (see the module)."""

    def _maps(
        self,
        record: LayerRecord,
        outputs: Tensor,
        classes: Tensor,
        inputs: Tensor,
        guide: GuidedSwitch | None,
    ) -> Tensor:
        activation, gradient = self._laid_out(record, _class_scores(outputs, classes))
        if activation.dim() < 3:
            raise ValueError(
                f"Grad-CAM needs a layer with spatial dimensions, but its output has shape "
                f"{tuple(activation.shape)}; choose a convolutional layer"
            )
        spatial = tuple(range(2, activation.dim()))
        channel_weights = gradient.mean(dim=spatial, keepdim=True)
        return torch.relu((channel_weights * activation).sum(dim=1, keepdim=True))


class DifferentiableGuidedGradCam(DifferentiableGradCam):
    """Guided Grad-CAM for ``classes``: upsampled Grad-CAM times the guided input gradient.

    Guided backpropagation runs through the model's ``nn.ReLU`` modules with hooks that exist only
    inside the call (see :func:`~captum_normgrad.training.guided_relus`); the model is not changed.
    """

    def _prepare_inputs(self, inputs: Tensor) -> Tensor:
        # The guided gradient is taken with respect to the image, a constant of training.
        return inputs.detach().requires_grad_()

    def _hooks(self) -> AbstractContextManager[GuidedSwitch | None]:
        return guided_relus(self.model)

    def _maps(
        self,
        record: LayerRecord,
        outputs: Tensor,
        classes: Tensor,
        inputs: Tensor,
        guide: GuidedSwitch | None,
    ) -> Tensor:
        grad_cam = super()._maps(record, outputs, classes, inputs, guide)
        with guide.on():
            (guided,) = torch.autograd.grad(
                _class_scores(outputs, classes), inputs, create_graph=True, retain_graph=True
            )
        upsampled = LayerAttribution.interpolate(grad_cam, tuple(inputs.shape[2:]), "bilinear")
        return guided * upsampled


class DifferentiableNormGrad(DifferentiableSaliency):
    """Order-0 NormGrad at ``layer`` for ``classes``, differentiable in the weights.

    ``g`` is the gradient of the cross-entropy with ``classes`` as labels, summed over the batch,
    exactly as ``LayerNormGrad(model, layer).attribute(inputs, target=classes,
    create_graph=True)`` computes it, but from the training step's own forward pass.
    """

    def _maps(
        self,
        record: LayerRecord,
        outputs: Tensor,
        classes: Tensor,
        inputs: Tensor,
        guide: GuidedSwitch | None,
    ) -> Tensor:
        loss = F.cross_entropy(outputs, classes, reduction="sum")
        activation, gradient = self._laid_out(record, loss)
        return channel_norm(activation) * channel_norm(gradient)
