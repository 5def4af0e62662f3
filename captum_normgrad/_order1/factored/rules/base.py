"""What every factored rule shares: :class:`Factors`, the :class:`ModuleRule` interface, and the
base of the layers whose weight gradient is a sum of outer products (linear, convolution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["Factors", "MatrixRule", "ModuleRule", "rows_scaled", "scaled", "trainable"]


@dataclass
class Factors:
    """One example-batch's gradient of one module's parameters, kept as what it is made of.

    Attributes:
        inputs: the module's input in that pass, ``(B, ...)``, detached.
        grads: ``d loss / d output`` in that pass, ``(B, ...)``.
    """

    inputs: Tensor
    grads: Tensor
    # What the rule derives from them, computed once for all the passes that use the update.
    derived: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def detached(self) -> Factors:
        """The same factors outside the autograd graph, with a derived cache of their own."""
        return Factors(self.inputs.detach(), self.grads.detach())

    def released(self) -> Factors:
        """The same factors once their rule has derived all it reads: the layer's input and
        gradient become meta tensors, so their memory is free for the passes still to run while
        their shapes still decide the rule's route (reading their values raises)."""
        return Factors(self.inputs.to("meta"), self.grads.to("meta"), self.derived)

    def cached(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        if key not in self.derived:
            self.derived[key] = compute()
        return self.derived[key]


def trainable(parameter: Tensor | None) -> bool:
    return parameter is not None and parameter.requires_grad


class ModuleRule:
    """How one module type runs at ``theta + s D`` and what ``||D||^2`` is, from :class:`Factors`."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def correction(
        self,
        new_input: Tensor,
        output_shape: torch.Size,
        factors: Factors,
        scale: Tensor | None = None,
    ) -> Tensor | None:
        """``module(new_input; theta + s D) - module(new_input; theta)``, broadcastable to
        ``output_shape`` (``s = 1`` without ``scale``); None when no parameter of the module is
        trainable. Linear in ``D``, and differentiable in ``new_input``: paired with the output
        gradient ``g`` of ``new_input``'s pass it is ``<G, D>`` (``sum_u <g_u, D p_u>``), which the
        exact Hessian-vector product differentiates."""
        raise NotImplementedError

    def squared_norm(self, factors: Factors) -> Tensor:
        """``||D||^2`` over the module's trainable parameters, ``(B,)``."""
        raise NotImplementedError

    def reads_only_derived(self, factors: Factors) -> bool:
        """Whether the layer at this update, once run, reads only what the rule derived from
        ``factors`` (each example's update, formed), not the layer's input and gradient."""
        return False

    # Whether :meth:`twice_differentiable_output` replaces the module's own forward in pass 1 of
    # the exact Hessian-vector product, which keeps its backward in the graph.
    rewrites_for_double_backward = False

    def twice_differentiable_output(self, new_input: Tensor) -> Tensor:
        """``module(new_input; theta)`` by operations whose backward is cheap to differentiate
        again."""
        raise NotImplementedError

    def replaces(self, factors: Factors) -> bool:
        """Whether to compute the whole output at ``theta + s D`` (:meth:`output_at`) instead of
        the shared output plus :meth:`correction`: where the update is formed per example anyway,
        one layer call with each example's own parameters costs half of two."""
        return False

    def output_at(self, new_input: Tensor, factors: Factors, scale: Tensor) -> Tensor:
        """``module(new_input; theta + s D)``."""
        raise NotImplementedError


class MatrixRule(ModuleRule):
    """Layers whose weight gradient is ``sum_u gamma_u p_u^T`` over ``L`` locations: patches ``p``
    of ``rows`` entries, output gradients ``gamma`` of ``columns``, in ``G`` = examples x groups
    blocks.

    At an update, the weight part of the correction is either ``Gram(new, old) Gamma``, with the
    ``L' x L`` Gram matrix of the two passes' patches (cheap where ``L`` is small against the
    layer's width: deep layers), or goes through the update ``D`` formed once per example
    (:meth:`_uses_gram` decides from the sizes).
    """

    rows: int
    columns: int

    def __init__(self, module: nn.Module, groups: int = 1) -> None:
        super().__init__(module)
        # Kept now: during the passes the module holds detached aliases of its parameters.
        self.weight: Tensor = module.weight
        self.bias: Tensor | None = module.bias
        self.groups = groups

    # The layer's geometry, defined by each subclass.
    def _patches(self, inputs: Tensor) -> Tensor:
        """``(G, L, rows)``."""
        raise NotImplementedError

    def _grad_blocks(self, grads: Tensor) -> Tensor:
        """``(G, L, columns)``."""
        raise NotImplementedError

    def _to_output(self, blocks: Tensor, output_shape: torch.Size) -> Tensor:
        """``(G, L', columns)`` back to the module's output layout."""
        raise NotImplementedError

    def _bias_update(self, grads: Tensor) -> Tensor:
        """Each example's bias gradient, ``(B, out)``."""
        raise NotImplementedError

    def _bias_to_output(self, bias_update: Tensor, output_shape: torch.Size) -> Tensor:
        """``(B, out)`` broadcast over the module's output layout."""
        raise NotImplementedError

    def _weight_update(self, factors: Factors) -> Tensor:
        """Each example's weight gradient, its first dimension ``B`` times something."""
        raise NotImplementedError

    def _uses_gram(self, factors: Factors) -> bool:
        raise NotImplementedError

    def _apply_update(self, new_input: Tensor, update: Tensor, output_shape: torch.Size) -> Tensor:
        """The layer without bias on ``new_input``, with each example's (scaled) ``update``."""
        raise NotImplementedError

    def _gram_matrix(self, new_input: Tensor, inputs: Tensor) -> Tensor:
        """``<p'_u', p_u>`` for every pair of locations, ``(G, L', L)``."""
        return torch.bmm(self._patches(new_input), self._patches(inputs).transpose(1, 2))

    # Shared by both.
    def _grads(self, factors: Factors) -> Tensor:
        return factors.cached("grad_blocks", lambda: self._grad_blocks(factors.grads))

    def _update(self, factors: Factors) -> Tensor:
        return factors.cached("update", lambda: self._weight_update(factors))

    def correction(
        self,
        new_input: Tensor,
        output_shape: torch.Size,
        factors: Factors,
        scale: Tensor | None = None,
    ) -> Tensor | None:
        total = None
        if trainable(self.weight):
            if self._uses_gram(factors):
                gram = self._gram_matrix(new_input, factors.inputs)
                blocks = torch.bmm(gram, self._grads(factors))
                total = self._to_output(scaled(blocks, scale), output_shape)
            else:
                update = self._update(factors)
                total = self._apply_update(new_input, scaled(update, scale), output_shape)
        if trainable(self.bias):
            bias_update = factors.cached("bias_update", lambda: self._bias_update(factors.grads))
            bias_part = self._bias_to_output(scaled(bias_update, scale), output_shape)
            total = bias_part if total is None else total + bias_part
        return total

    def reads_only_derived(self, factors: Factors) -> bool:
        return not (trainable(self.weight) and self._uses_gram(factors))

    def squared_norm(self, factors: Factors) -> Tensor:
        examples = factors.grads.shape[0]
        total = factors.grads.new_zeros(examples)
        if trainable(self.weight):
            if "update" in factors.derived or not self._uses_gram(factors):
                products = self._update(factors).square()
            else:
                # ||sum_u g_u p_u^T||^2 = sum_{u,v} <g_u, g_v> <p_u, p_v>
                grads = self._grads(factors)
                gram = self._gram_matrix(factors.inputs, factors.inputs)
                products = gram * torch.bmm(grads, grads.transpose(1, 2))
            total = total + products.reshape(examples, -1).sum(dim=1)
        if trainable(self.bias):
            bias_update = factors.cached("bias_update", lambda: self._bias_update(factors.grads))
            total = total + bias_update.square().sum(dim=1)
        return total


def scaled(blocks: Tensor, scale: Tensor | None) -> Tensor:
    """``blocks`` with each example's rows times its scale (as they are without one)."""
    return blocks if scale is None else blocks * rows_scaled(scale, blocks)


def rows_scaled(scale: Tensor, blocks: Tensor) -> Tensor:
    """Each example's scale, repeated over its rows of ``blocks`` and shaped to broadcast."""
    per_row = blocks.shape[0] // scale.shape[0]
    scales = scale.to(blocks.dtype)
    if per_row > 1:
        scales = scales.repeat_interleave(per_row)
    return scales.reshape(-1, *[1] * (blocks.dim() - 1))
