r"""NormGrad at order 1 and the adversarial map (Rebuffi et al., 2019, section 1.2).

Order 0 scores a location by its share of the training gradient, which is the same whether the
step would help or hurt: the adversarial class lights up as much as the target. Order 1 asks which
locations matter for the loss *after* one SGD step on this example, ``l(theta - eps grad l(theta))``
(as in meta-learning). For one example with label ``y``, ``theta`` = every parameter that requires
grad:

    theta'   = theta - eps * grad l(theta)                     (the inner step)
    v        = grad l(theta'),   h = h_scale / ||v||_2
    m_u      = || g_u(theta') - eps/(2h) * (g_u(theta + h v) - g_u(theta - h v)) || * ||x_u(theta')||

``x`` is the layer's activation, ``g = d l / d x``; the difference quotient is the paper's central
finite difference for the Hessian-vector product ``H(theta) v`` restricted to the layer (four
forward-backward passes per example). ``hvp="exact"`` takes that product exactly instead (no
``h``): by a double backward (loop and factored modes), forward-over-reverse under vmap. As
``eps -> 0`` the map is order 0.

The adversarial map descends ``-l(theta + eps grad l(theta))``: the inner step and the sign of the
correction flip, ``theta' = theta + eps grad l(theta)`` and ``|| g_u(theta') + eps H v ||``. It
highlights what degrades the model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Literal

from torch import Tensor, nn

from captum_normgrad._core.captum import (
    TargetType,
    format_additional_forward_args,
    log_usage,
)
from captum_normgrad._core.capture import LayerRecord
from captum_normgrad._core.front_door import (
    check_grad_mode,
    check_loss,
    check_target,
    checked_inputs,
)
from captum_normgrad._core.layouts import ReshapeTransform, recording_grids
from captum_normgrad._core.model_state import models_behind
from captum_normgrad._order1.autograd import ForwardCaller
from captum_normgrad._order1.engine import order1_records
from captum_normgrad._order1.examples import is_per_example, slice_examples, target_of_examples
from captum_normgrad._order1.plan import BatchMode
from captum_normgrad._order1.settings import Order1Settings
from captum_normgrad.losses import LossSpec
from captum_normgrad.normgrad import LayerNormGrad

__all__ = ["LayerNormGradAdversarial", "LayerNormGradOrder1"]

HvpMethod = Literal["finite_difference", "exact"]

_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _model_of(forward_func: Callable[..., Tensor]) -> nn.Module:
    """The module whose parameters the inner step moves: ``forward_func`` or its bound owner."""
    owners = models_behind(forward_func, [])
    if not owners:
        raise TypeError(
            "order 1 steps the model's parameters, so forward_func must be an nn.Module or a bound "
            f"method of one, got {forward_func!r}; wrap the function in an nn.Module"
        )
    return owners[0]


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def _check_loss(loss: LossSpec) -> None:
    check_loss(loss)
    if loss == "output":
        raise ValueError(
            "order 1 takes an SGD step on a training loss; loss='output' (Captum's convention of "
            "backpropagating the raw score) is not a loss to descend. Use loss='cross_entropy' "
            "(default) or a callable loss(outputs, target) -> per-example losses"
        )


def _check_deterministic(model: nn.Module) -> None:
    """Each pass would draw a new dropout mask: the finite difference would compare two different
    networks and the map would be noise."""
    for name, module in model.named_modules():
        if isinstance(module, _DROPOUT) and module.training and module.p > 0:
            raise ValueError(
                f"dropout module '{name or type(module).__name__}' is in training mode; the passes "
                "of order 1 must see the same network. Call model.eval() before attributing"
            )


class LayerNormGradOrder1(LayerNormGrad):
    r"""NormGrad order 1: where the image matters for *training* on it, after one inner SGD step.

    Per example, ``theta' = theta - eps grad l(theta)`` on every parameter that requires grad
    (frozen ones stay frozen), then

        ``m_u = || g_u(theta') - eps H(theta) v ||_u * ||x_u(theta')||,   v = grad l(theta')``

    with ``H v`` by the paper's central finite difference (four forward-backward passes per example)
    or exactly (``hvp="exact"``). Unlike order 0, the map depends on whether the step helps: in the
    paper's figures it keeps the target's evidence and drops the adversarial class's. The model is
    evaluated functionally (``torch.func.functional_call``): it is never stepped, not even
    temporarily; the inner passes update only copies of its buffers (BatchNorm in train mode).

    The passes run one example at a time with plain autograd (``batch_mode="loop"``, see
    ``captum_normgrad/_order1/loop.py``), so full backward hooks and non-reentrant activation
    checkpointing work: the maps equal those of the same model without them. The user's full
    backward hooks fire in each backward pass that crosses their module (up to 4 per example).
    Reentrant checkpointing (``use_reentrant=True``) is refused, naming the layer when it is inside
    the checkpointed block. Any :class:`~captum_normgrad.training.NormGradMonitor` ignores the
    passes.

    Args:
        forward_func: the model (an ``nn.Module``), or a bound method of one; its parameters are
            ``theta``.
        layer: a module inside the model, or a list of them (a list of maps, from the same passes).
        device_ids: not supported, as for :class:`LayerNormGrad`.
        reshape_transform: as for :class:`LayerNormGrad`; applied to the activation and the
            corrected gradient of every example alike.

    Example:
        >>> import torchvision
        >>> from captum.attr import LayerAttribution
        >>> model = torchvision.models.resnet18().eval()
        >>> images = torch.randn(2, 3, 224, 224)
        >>> order1 = LayerNormGradOrder1(model, [model.layer2, model.layer3])
        >>> maps = order1.attribute(images, target=281)            # 281: tabby cat
        >>> [tuple(m.shape) for m in maps]
        [(2, 1, 28, 28), (2, 1, 14, 14)]
        >>> upsampled = LayerAttribution.interpolate(maps[0], (224, 224), "bilinear")
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: nn.Module | Sequence[nn.Module],
        device_ids: list[int] | None = None,
        reshape_transform: ReshapeTransform | Sequence[ReshapeTransform | None] | None = None,
    ) -> None:
        super().__init__(forward_func, layer, device_ids, reshape_transform)
        self.model = _model_of(forward_func)
        # The planner's layer sizes of one example, per input shape (plan_call).
        self._layer_bytes: dict[tuple, int | None] = {}
        inside = {id(module) for module in self.model.modules()}
        for module in self.layers:
            if id(module) not in inside:
                raise ValueError(
                    f"layer {type(module).__name__} is not a submodule of the model; order 1 needs "
                    "the layer inside the model whose parameters it steps"
                )

    def _inner_learning_rate(self, eps: float) -> float:
        """The one step the adversarial map overrides: ``theta' = theta - lr grad l(theta)`` and the
        corrected gradient ``g(theta') - lr H v``. Descending the loss: ``lr = eps``."""
        return eps

    @log_usage(part_of_slo=True)
    def attribute(  # type: ignore[override]  # order-1 hyperparameters instead of create_graph
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: object = None,
        attribute_to_layer_input: bool = False,
        loss: LossSpec = "cross_entropy",
        eps: float = 5e-4,
        h_scale: float = 0.5,
        hvp: HvpMethod = "finite_difference",
        batch_mode: BatchMode = "auto",
        chunk_size: int | None = None,
    ) -> Tensor | list[Tensor]:
        r"""Compute the map at each layer, each example with its own inner step.

        Args:
            inputs, target, additional_forward_args, attribute_to_layer_input: as for
                :meth:`LayerNormGrad.attribute`. The label is resolved at ``theta`` (the top-1
                class when ``target`` is None) and used in every pass: from the first pass of each
                example in the loop (of each chunk in the factored mode), from one forward pass of
                each chunk under vmap (the same labels unless BatchNorm is in training mode, where
                the loop's are batch-invariant).
                Additional forward arguments that are tensors with the batch as first dimension are
                split per example; others are passed whole.
            loss: ``"cross_entropy"`` (default) or a callable ``loss(outputs, target) -> (N,)``,
                called on one example at a time. ``"output"`` is refused: order 1 needs a loss to
                descend.
            eps: the learning rate of the inner SGD step (paper: ``5e-4``).
            h_scale: the finite-difference step is ``h = h_scale / ||grad l(theta')||_2``
                (paper: ``0.5``). Unused with ``hvp="exact"``.
            hvp: ``"finite_difference"`` (the paper, four passes per example) or ``"exact"``
                (two passes and a double backward through the first, in the loop and the
                factored mode; under vmap, forward-over-reverse, the last pass carrying
                tangents). Refused, naming the operation, for a model with an operation PyTorch
                cannot differentiate twice (``hardsigmoid`` in MobileNetV3).
            batch_mode: ``"loop"`` runs the passes on one example at a time with plain autograd
                (least memory, every model autograd runs). ``"factored"`` runs each pass ONCE for a
                chunk of examples at the shared parameters, each example's own parameter update
                added layer by layer from its factors (``captum_normgrad/_order1/factored/``;
                the same maps up to rounding); it runs models made of convolutions, linear
                layers, BatchNorm in evaluation mode and operations that keep the examples apart
                (checked on the model's ``torch.fx`` graph; anything else is refused with the
                reason). ``"vmap"`` runs chunks through ``torch.func.vmap`` (about five copies of
                the trainable parameters per example; refused for full backward hooks and
                checkpointing). ``"auto"``, on CPU with a cross-entropy loss, takes the factored
                passes where they run and the layers hold at most 192 MB per example (faster
                than the loop on the models measured, for more memory), else the loop; on CUDA,
                vmap with a cross-entropy loss, else the loop. The README's measured cost has
                the times and memory of each mode.
            chunk_size: examples per factored chunk or vmapped call; default: about 768 MB of
                layer inputs and outputs per factored chunk; for vmap, as many as fit in half the
                free CUDA memory (a quarter of the available RAM on CPU).

        Returns:
            A detached ``(N, 1, *S)`` map per layer; a list in the given order when ``layer`` was a
            list.

        Raises:
            ValueError: ``loss="output"``, non-positive ``eps`` / ``h_scale``, no parameter that
                requires grad, dropout in training mode, non-finite inputs, a target or outputs the
                loss cannot take, reentrant checkpointing, train-mode BatchNorm that cannot
                normalise one example, ``hvp="exact"`` without a second derivative,
                ``batch_mode="vmap"`` on a model torch.func cannot run.
            RuntimeError: a layer that never ran, or ran more than once in the forward pass.
        """
        # The front door, as for every method, then order 1's own hyperparameters: all before
        # anything about the model is checked or run.
        check_grad_mode()
        inputs = checked_inputs(inputs)
        _check_loss(loss)
        check_target(target, inputs[0].shape[0], loss)
        _check_positive("eps", eps)
        _check_positive("h_scale", h_scale)
        if hvp not in ("finite_difference", "exact"):
            raise ValueError(f"hvp must be 'finite_difference' or 'exact', got {hvp!r}")
        with recording_grids(self.layouts):
            records = self._order1_records(
                inputs,
                target,
                additional_forward_args,
                attribute_to_layer_input,
                loss,
                Order1Settings(
                    learning_rate=self._inner_learning_rate(float(eps)),
                    h_scale=float(h_scale),
                    exact_hvp=hvp == "exact",
                ),
                batch_mode=batch_mode,
                chunk_size=chunk_size,
            )
            maps = self._maps(records)
        return maps if self._returns_list else maps[0]

    def _order1_records(
        self,
        inputs: tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: object,
        attribute_to_layer_input: bool,
        loss: LossSpec,
        settings: Order1Settings,
        *,
        batch_mode: BatchMode,
        chunk_size: int | None,
    ) -> list[LayerRecord]:
        """Each record gets ``x(theta')`` as its activation and the corrected gradient as its
        gradient, so that order 0's ``_layer_map`` gives the order-1 map."""
        inputs = tuple(x.detach() for x in inputs)  # checked by the front door in attribute
        args = format_additional_forward_args(additional_forward_args) or ()
        caller = ForwardCaller(self.model, self.forward_func)
        theta = {
            name: parameter.detach()
            for name, parameter in caller.named_parameters()
            if parameter.requires_grad
        }
        if not theta:
            raise ValueError(
                "the model has no parameter that requires grad: order 1 steps the trainable "
                "parameters, so there is nothing to step. Unfreeze some (requires_grad=True)"
            )
        _check_deterministic(self.model)
        return order1_records(
            caller=caller,
            forward_func=self.forward_func,
            layers=self.layers,
            theta=theta,
            inputs=inputs,
            target=target,
            args=args,
            at_input=attribute_to_layer_input,
            loss=loss,
            settings=settings,
            batch_mode=batch_mode,
            chunk_size=chunk_size,
            layer_bytes=self._layer_bytes,
            check_first_chunk=functools.partial(
                self._check_first_chunk,
                inputs=inputs,
                target=target,
                args=args,
                at_input=attribute_to_layer_input,
                loss=loss,
            ),
        )

    def _check_first_chunk(
        self,
        activations: Sequence[Tensor],
        corrected: Sequence[Tensor],
        *,
        inputs: tuple[Tensor, ...],
        target: TargetType,
        args: tuple,
        at_input: bool,
        loss: LossSpec,
    ) -> None:
        """What is checked on the first example's (or chunk's) terms, so that a problem is refused
        before the other examples' passes run: the maps' layout, and, where a layer's corrected
        gradient is all zeros, whether the layer reaches the loss at all. The passes cannot tell a
        layer the loss ignores from one whose gradient happens to vanish; order 0's capture can,
        and is run on the first example only then (it refuses an unreached layer by name)."""
        for layout, activation in zip(self.layouts, activations):
            layout.side(at_input).channels_first(activation)
        if all(gradient.any() for gradient in corrected):
            return
        num_examples = inputs[0].shape[0]
        per_example = [is_per_example(a, num_examples) for a in args]
        first = slice_examples(inputs, args, per_example, 0, 1)
        self._layer_records(
            first[: len(inputs)],
            target_of_examples(target, 0, 1, num_examples),
            first[len(inputs) :] or None,
            at_input,
            loss,
            False,
        )


class LayerNormGradAdversarial(LayerNormGradOrder1):
    r"""The paper's adversarial map: where the image would most *degrade* the model.

    It descends ``-l(theta + eps grad l(theta))``: per example ``theta' = theta + eps grad l(theta)``
    (a step up the loss) and

        ``m_u = || g_u(theta') + eps H(theta) v ||_u * ||x_u(theta')||,   v = grad l(theta')``.

    Same arguments as :class:`LayerNormGradOrder1`; on an image with two classes it highlights the
    other one (the paper's cat-and-dog figure).
    """

    def _inner_learning_rate(self, eps: float) -> float:
        return -eps
