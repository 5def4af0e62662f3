"""NormGrad at order 0 (Rebuffi et al., 2019), beside ``captum.attr.LayerGradCam``.

The weight gradient of a convolution is a sum over locations ``u`` of outer products
``g_u x_u^T`` (``g = d loss / d output``, ``x`` = the input at ``u``). NormGrad keeps these terms apart
and scores each location by the Frobenius norm of its own term. Inserting a virtual 1x1 identity
convolution at any point of the network gives the map

    m_u = ||x_u|| * ||g_u||            (norms over channels)

for the activation ``x`` there, at every depth, from one forward and one backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from captum.attr import GradientAttribution, LayerAttribution
from torch import Tensor, nn

from captum_normgrad._core.captum import (
    TargetType,
    format_additional_forward_args,
    log_usage,
    run_forward,
)
from captum_normgrad._core.capture import (
    LayerRecord,
    capture_layers,
    check_each_ran_once,
    layer_gradients,
)
from captum_normgrad._core.front_door import (
    check_grad_mode,
    check_loss,
    check_target,
    checked_inputs,
)
from captum_normgrad._core.layer_map import channel_norm, check_finite_map, laid_out
from captum_normgrad._core.layouts import ReshapeTransform, recording_grids, resolve_layouts
from captum_normgrad._core.model_state import models_behind, preserved_buffers
from captum_normgrad.losses import LossSpec, per_example_loss

__all__ = ["LayerNormGrad", "LayerNormGradSelective", "channel_norm"]


class LayerNormGrad(LayerAttribution, GradientAttribution):
    r"""NormGrad order 0 with the virtual 1x1 identity: ``m_u = ||x_u|| * ||g_u||`` at a layer.

    ``x`` is the layer's output (or input) and ``g`` the gradient of the loss with respect to it.
    ``||g_u x_u^T||_F = ||x_u|| ||g_u||`` is the norm of location ``u``'s contribution to the weight
    gradient of a 1x1 identity convolution inserted there: the map says which locations drive
    *training*, and works at any depth, including layers Grad-CAM cannot use.

    Args:
        forward_func: the model, or any function of the inputs returning its outputs.
        layer: a module, or a list of modules. With a list, ``attribute`` returns a list of maps, all
            from ONE forward and ONE backward pass.
        device_ids: accepted for signature parity with Captum's layer methods; ``DataParallel``
            models are not supported.
        reshape_transform: turns a layer's activation into ``(N, C, *S)``, channels first
            (pytorch-grad-cam's name and meaning), applied alike to the activation and its
            gradient before the norms: :class:`~captum_normgrad.TokensToGrid` for ViT tokens,
            :func:`~captum_normgrad.channels_last_to_first` for Swin / ConvNeXt internals. One
            callable for every layer or a list with one per layer. ``None`` (default) reads the
            layout from a torchvision ViT, Swin or ConvNeXt, and otherwise refuses, at call time,
            an activation whose channels look last (``nn.Linear``, ``nn.LayerNorm``, attention)
            instead of returning a map over the wrong axis.

    Example:
        >>> import torchvision
        >>> from captum.attr import LayerAttribution, LayerGradCam
        >>> model = torchvision.models.resnet18().eval()
        >>> images = torch.randn(2, 3, 224, 224)
        >>> normgrad = LayerNormGrad(model, [model.layer2, model.layer3, model.layer4])
        >>> maps = normgrad.attribute(images, target=281)   # 281: tabby cat
        >>> [tuple(m.shape) for m in maps]
        [(2, 1, 28, 28), (2, 1, 14, 14), (2, 1, 7, 7)]
        >>> upsampled = LayerAttribution.interpolate(maps[0], (224, 224), "bilinear")
    """

    # Whether the capture keeps each layer's input too (the real-convolution form needs its patches).
    _keeps_layer_input = False

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: nn.Module | Sequence[nn.Module],
        device_ids: list[int] | None = None,
        reshape_transform: ReshapeTransform | Sequence[ReshapeTransform | None] | None = None,
    ) -> None:
        if device_ids is not None or isinstance(forward_func, nn.DataParallel):
            raise NotImplementedError(
                f"{type(self).__name__} does not support DataParallel / device_ids; attribute on the "
                "wrapped module (model.module) instead"
            )
        is_list = isinstance(layer, (list, tuple, nn.ModuleList))
        layers = list(layer) if is_list else [layer]
        if not layers:
            raise ValueError("layer is an empty list; give at least one module")
        for module in layers:
            if not isinstance(module, nn.Module):
                raise TypeError(f"layer must be an nn.Module or a list of them, got {module!r}")
        self.layouts = resolve_layouts(forward_func, layers, reshape_transform)
        self._check_layers(layers)
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        GradientAttribution.__init__(self, forward_func)
        self.layers = layers
        self._returns_list = is_list

    def _check_layers(self, layers: list[nn.Module]) -> None:
        """Hook for variants that only accept some module types (``self.layouts`` is set)."""

    def _layer_map(self, record: LayerRecord) -> Tensor:
        """A record's activation and gradient, moved to ``(N, C, *S)`` by the layer's reshape
        transform (the same for both), then the variant's norm step."""
        layout = self.layouts[self.layers.index(record.layer)].side(record.at_input)
        activation, gradient = laid_out(layout, record.activation, record.gradient)
        return self._norm_map(activation, gradient, record.evidence_sign)

    def _norm_map(self, activation: Tensor, gradient: Tensor, evidence_sign: int) -> Tensor:
        """The one step a variant overrides: channels-first ``x`` and ``g`` -> ``(N, 1, *S)``."""
        return channel_norm(activation) * channel_norm(gradient)

    def _maps(self, records: Sequence[LayerRecord], create_graph: bool = False) -> list[Tensor]:
        """Every record's map, checked finite; differentiable (also under the caller's
        ``torch.no_grad()``) when ``create_graph``, detached otherwise."""
        with torch.enable_grad() if create_graph else nullcontext():
            maps = [check_finite_map(self._layer_map(record), record.name) for record in records]
        return maps if create_graph else [layer_map.detach() for layer_map in maps]

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: object = None,
        attribute_to_layer_input: bool = False,
        loss: LossSpec = "cross_entropy",
        create_graph: bool = False,
    ) -> Tensor | list[Tensor]:
        r"""Compute the map at each layer from one forward and one backward pass.

        Args:
            inputs: a tensor, or a tuple of tensors, batch first, as for Captum's methods.
            target: the class (or output index) each example is explained for, in any form Captum
                accepts: an ``int``, a list or 1-D tensor with one entry per example, a tuple (for
                multi-dimensional outputs with ``loss="output"``). ``None`` with cross-entropy
                uses the model's top-1 prediction as the label. A segmenter (output
                ``(N, K, *S)`` or torchvision's ``{"out": ...}``) also takes a mask ``(N, *S)``
                (255 and -100 ignored); a class there is the region predicted as it
                (:mod:`captum_normgrad.losses`).
            additional_forward_args: extra arguments passed to ``forward_func`` after the inputs.
            attribute_to_layer_input: take ``x`` and ``g`` at the layer's input instead of output.
            loss: what is backpropagated (see :mod:`captum_normgrad.losses`): ``"cross_entropy"``
                (default, the paper's training loss, summed over the batch so each example's map is
                independent of its batch-mates), ``"output"`` (Captum's convention, as
                ``LayerGradCam``), or a callable ``loss(outputs, target) -> (N,)``.
            create_graph: keep the graph so the maps can be differentiated (training-time use).
                Otherwise maps are detached.

        Returns:
            A ``(N, 1, *S)`` map per layer, ``S`` the layer's location dims (none for ``(N, C)``
            activations); a list in the given order when ``layer`` was a list.

        Raises:
            ValueError: ``inputs`` is None, non-finite inputs, a target or loss that does not fit
                the outputs.
            TypeError: ``inputs`` is not a tensor or tuple of tensors (a list, a NumPy array), a
                target of the wrong type.
            RuntimeError: a layer that never ran, ran more than once in the forward pass, or ran
                with grad disabled (reentrant checkpointing); a map that overflows the dtype.
        """
        with recording_grids(self.layouts):
            records = self._layer_records(
                inputs,
                target,
                additional_forward_args,
                attribute_to_layer_input,
                loss,
                create_graph,
            )
            maps = self._maps(records, create_graph)
        return maps if self._returns_list else maps[0]

    def _layer_records(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: object,
        attribute_to_layer_input: bool,
        loss: LossSpec,
        create_graph: bool,
    ) -> list[LayerRecord]:
        """One forward and one backward pass; each record gets its activation and gradient."""
        check_grad_mode()
        inputs = checked_inputs(inputs)
        check_loss(loss)
        check_target(target, inputs[0].shape[0], loss)
        additional_forward_args = format_additional_forward_args(additional_forward_args)
        model_modules = models_behind(self.forward_func, self.layers)
        with (
            torch.enable_grad(),
            preserved_buffers(model_modules),
            capture_layers(
                self.forward_func,
                self.layers,
                at_input=attribute_to_layer_input,
                keep_layer_input=self._keeps_layer_input,
            ) as records,
        ):
            outputs = run_forward(self.forward_func, inputs, None, additional_forward_args)
            records.end_forward()
            check_each_ran_once(records)
            total_loss = per_example_loss(outputs, target, loss).sum()
            layer_gradients(total_loss, records, create_graph)
        for record in records:
            record.evidence_sign = 1 if loss == "output" else -1
            if not create_graph:
                record.activation = record.activation.detach()
        return records


class LayerNormGradSelective(LayerNormGrad):
    r"""Class-selective NormGrad (the authors' later work): ``m_u = || max(x_u * g_u, 0) ||``.

    Only channels where the activation and the gradient toward the target agree in sign survive,
    which suppresses the adversarial-class evidence plain NormGrad also highlights. "Toward the
    target" is the gradient of the score with ``loss="output"`` and the *negative* gradient of a loss
    (cross-entropy or a callable), which is minimised: in both cases the kept channels are those whose
    contribution the training step reinforces. Same arguments as :class:`LayerNormGrad`.
    """

    def _norm_map(self, activation: Tensor, gradient: Tensor, evidence_sign: int) -> Tensor:
        return channel_norm(torch.relu(activation * (evidence_sign * gradient)))
