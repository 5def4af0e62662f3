"""Per-example parameter updates of order 1 kept as factors, for ``batch_mode="factored"``.

Every example of order 1 runs at its own parameters ``theta + s_i D_i``, where ``D_i`` is a gradient
of that example's loss (``s_i = -eps`` with ``D_i = grad l(theta)`` for the inner step,
``s_i = +-h_i`` with ``D_i = grad l(theta')`` for the finite difference). A layer's weight gradient
for one example is a sum over its output locations ``u`` of outer products,

    ``D_i = sum_u  gamma_u  p_u^T``    (``gamma_u``: d loss / d output at ``u``; ``p_u``: input patch)

so it never needs to exist as a weight-sized tensor per example. The layer at the moved parameters
is the shared layer plus a correction that is linear in ``D_i``::

    conv(x', W + s D) = conv(x', W) + s * sum_u gamma_u <p_u, p'_u'>     (at each location u')

The shared part runs for the whole batch at once; the correction costs ``L L' (K + C_out)`` per
example through the Gram matrix of the two passes' patches (cheap in deep layers, where ``L`` is
small and the weights are large), or ``(L + L') K C_out`` by forming ``D`` (cheap in shallow
layers); the cheaper of the two is taken per layer. Both are the same number up to rounding.

A rule per module type: :class:`ConvRule` (``nn.Conv1d``, ``nn.Conv2d``), :class:`LinearRule`,
:class:`BatchNormRule` (evaluation mode: an affine map per channel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RULES", "Factors", "ModuleRule", "rule_for"]


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

    def cached(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        if key not in self.derived:
            self.derived[key] = compute()
        return self.derived[key]


def _trainable(parameter: Tensor | None) -> bool:
    return parameter is not None and parameter.requires_grad


def _per_example(values: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` scales shaped to broadcast over ``like`` (batch first)."""
    return values.reshape(-1, *[1] * (like.dim() - 1)).to(like.dtype)


def _gram_cheaper(locations: int, new_locations: int, rows: int, cols: int) -> bool:
    """Multiply through the ``L x L'`` Gram matrix rather than form the ``rows x cols`` update."""
    return locations * new_locations * (rows + cols) < (locations + new_locations) * rows * cols


class ModuleRule:
    """How one module type runs at ``theta + s D`` and what ``||D||^2`` is, from :class:`Factors`."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def correction(
        self, new_input: Tensor, output_shape: torch.Size, factors: Factors, scale: Tensor
    ) -> Tensor | None:
        """``module(new_input; theta + s D) - module(new_input; theta)``, broadcastable to
        ``output_shape``; None when no parameter of the module is trainable."""
        raise NotImplementedError

    def squared_norm(self, factors: Factors) -> Tensor:
        """``||D||^2`` over the module's trainable parameters, ``(B,)``."""
        raise NotImplementedError


class _MatrixRule(ModuleRule):
    """Layers whose weight gradient is ``sum_u gamma_u p_u^T`` over ``L`` locations: patches ``p``
    of ``rows`` entries, output gradients ``gamma`` of ``columns``, in ``G`` = examples x groups
    blocks.

    Per pass at an update, the weight part of the correction is either ``P' P^T Gamma`` through the
    ``L' x L`` Gram matrix, or the update ``D`` formed once (per example) and applied like the
    layer's weight; :func:`_gram_cheaper` picks from the sizes alone.
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

    def _locations(self, output_shape: torch.Size) -> int:
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

    def _apply_update(self, new_input: Tensor, update: Tensor, output_shape: torch.Size) -> Tensor:
        """The layer without bias on ``new_input``, with each example's (scaled) ``update``."""
        raise NotImplementedError

    # Shared by both.
    def _blocks(self, factors: Factors) -> tuple[Tensor, Tensor]:
        patches = factors.cached("patches", lambda: self._patches(factors.inputs))
        grads = factors.cached("grad_blocks", lambda: self._grad_blocks(factors.grads))
        return patches, grads

    def _gram(self, locations: int, new_locations: int) -> bool:
        return _gram_cheaper(locations, new_locations, self.rows, self.columns)

    def correction(
        self, new_input: Tensor, output_shape: torch.Size, factors: Factors, scale: Tensor
    ) -> Tensor | None:
        total = None
        if _trainable(self.weight):
            locations = self._locations(factors.grads.shape)
            if self._gram(locations, self._locations(output_shape)):
                patches, grads = self._blocks(factors)
                gram = torch.bmm(self._patches(new_input), patches.transpose(1, 2))
                blocks = torch.bmm(gram, grads)
                total = self._to_output(blocks * _rows_scaled(scale, blocks), output_shape)
            else:
                update = factors.cached("update", lambda: self._weight_update(factors))
                total = self._apply_update(
                    new_input, update * _rows_scaled(scale, update), output_shape
                )
        if _trainable(self.bias):
            bias_update = factors.cached("bias_update", lambda: self._bias_update(factors.grads))
            bias_part = self._bias_to_output(
                bias_update * _rows_scaled(scale, bias_update), output_shape
            )
            total = bias_part if total is None else total + bias_part
        return total

    def squared_norm(self, factors: Factors) -> Tensor:
        examples = factors.grads.shape[0]
        total = factors.grads.new_zeros(examples)
        if _trainable(self.weight):
            locations = self._locations(factors.grads.shape)
            if "update" in factors.derived or not self._gram(locations, locations):
                update = factors.cached("update", lambda: self._weight_update(factors))
                products = update.square()
            else:
                # ||sum_u g_u p_u^T||^2 = sum_{u,v} <g_u, g_v> <p_u, p_v>
                patches, grads = self._blocks(factors)
                products = torch.bmm(patches, patches.transpose(1, 2)) * torch.bmm(
                    grads, grads.transpose(1, 2)
                )
            total = total + products.reshape(examples, -1).sum(dim=1)
        if _trainable(self.bias):
            bias_update = factors.cached("bias_update", lambda: self._bias_update(factors.grads))
            total = total + bias_update.square().sum(dim=1)
        return total


def _rows_scaled(scale: Tensor, blocks: Tensor) -> Tensor:
    """Each example's scale, repeated over its rows of ``blocks`` and shaped to broadcast."""
    per_row = blocks.shape[0] // scale.shape[0]
    scales = scale.to(blocks.dtype)
    if per_row > 1:
        scales = scales.repeat_interleave(per_row)
    return scales.reshape(-1, *[1] * (blocks.dim() - 1))


class LinearRule(_MatrixRule):
    """``nn.Linear`` on ``(B, *, in_features)``: the locations are the middle dimensions (one for a
    ``(B, in_features)`` input, the tokens of a sequence)."""

    def __init__(self, module: nn.Linear) -> None:
        super().__init__(module)
        self.rows, self.columns = module.in_features, module.out_features

    def _patches(self, inputs: Tensor) -> Tensor:
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])

    def _grad_blocks(self, grads: Tensor) -> Tensor:
        return grads.reshape(grads.shape[0], -1, grads.shape[-1])

    def _locations(self, output_shape: torch.Size) -> int:
        return output_shape[1:-1].numel()

    def _to_output(self, blocks: Tensor, output_shape: torch.Size) -> Tensor:
        return blocks.reshape(output_shape)

    def _bias_update(self, grads: Tensor) -> Tensor:
        return self._grad_blocks(grads).sum(dim=1)

    def _bias_to_output(self, bias_update: Tensor, output_shape: torch.Size) -> Tensor:
        return bias_update.reshape(output_shape[0], *[1] * (len(output_shape) - 2), -1)

    def _weight_update(self, factors: Factors) -> Tensor:
        patches, grads = self._blocks(factors)
        return torch.bmm(patches.transpose(1, 2), grads)  # (B, in, out) = D^T

    def _apply_update(self, new_input: Tensor, update: Tensor, output_shape: torch.Size) -> Tensor:
        return torch.bmm(self._patches(new_input), update).reshape(output_shape)


class ConvRule(_MatrixRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` with numeric zero padding (a 1-D convolution is a 2-D one of
    height 1), a block per group. Patches come from ``F.unfold``; a formed update is applied, and
    formed, by the convolution's own kernels grouped by example (``groups = B x groups``)."""

    def __init__(self, module: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(module, groups=module.groups)
        self.one_d = isinstance(module, nn.Conv1d)
        if self.one_d:
            self.kernel_size = (1, module.kernel_size[0])
            self.dilation = (1, module.dilation[0])
            self.padding = (0, module.padding[0])
            self.stride = (1, module.stride[0])
        else:
            self.kernel_size, self.dilation = module.kernel_size, module.dilation
            self.padding, self.stride = module.padding, module.stride
        self.rows = module.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        self.columns = module.out_channels // self.groups

    def _as_2d(self, tensor: Tensor) -> Tensor:
        return tensor.unsqueeze(2) if self.one_d else tensor

    def _stacked(self, tensor: Tensor) -> Tensor:
        """``(B, C, H, W)`` as one example of ``B C`` channels: a convolution grouped by example."""
        flat = self._as_2d(tensor)
        return flat.reshape(1, -1, *flat.shape[2:])

    def _patches(self, inputs: Tensor) -> Tensor:
        columns = F.unfold(
            self._as_2d(inputs), self.kernel_size, self.dilation, self.padding, self.stride
        )
        examples, rows, locations = columns.shape  # the rows of one group are contiguous
        blocks = columns.reshape(examples * self.groups, rows // self.groups, locations)
        return blocks.transpose(1, 2)

    def _grad_blocks(self, grads: Tensor) -> Tensor:
        examples, channels = grads.shape[:2]
        blocks = grads.reshape(examples * self.groups, channels // self.groups, -1)
        return blocks.transpose(1, 2)

    def _locations(self, output_shape: torch.Size) -> int:
        return output_shape[2:].numel()

    def _to_output(self, blocks: Tensor, output_shape: torch.Size) -> Tensor:
        return blocks.transpose(1, 2).reshape(output_shape)

    def _bias_update(self, grads: Tensor) -> Tensor:
        return grads.reshape(*grads.shape[:2], -1).sum(dim=2)

    def _bias_to_output(self, bias_update: Tensor, output_shape: torch.Size) -> Tensor:
        return bias_update.reshape(*bias_update.shape, *[1] * (len(output_shape) - 2))

    def _weight_update(self, factors: Factors) -> Tensor:
        """``(B out_channels, in_channels / groups, kh, kw)``, by the weight-gradient kernel."""
        examples = factors.inputs.shape[0]
        module = self.module
        return torch.nn.grad.conv2d_weight(
            self._stacked(factors.inputs),
            (examples * module.out_channels, module.in_channels // self.groups, *self.kernel_size),
            self._stacked(factors.grads),
            self.stride,
            self.padding,
            self.dilation,
            examples * self.groups,
        )

    def _apply_update(self, new_input: Tensor, update: Tensor, output_shape: torch.Size) -> Tensor:
        examples = new_input.shape[0]
        out = F.conv2d(
            self._stacked(new_input),
            update,
            None,
            self.stride,
            self.padding,
            self.dilation,
            examples * self.groups,
        )
        return out.reshape(output_shape)


class BatchNormRule(ModuleRule):
    """``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` in evaluation mode: ``x_hat * gamma + beta`` per
    channel, ``x_hat`` from the running statistics, so no example sees another."""

    def __init__(self, module: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__(module)
        self.weight, self.bias = module.weight, module.bias  # as for _MatrixRule

    def _normalized(self, inputs: Tensor) -> Tensor:
        module = self.module
        shape = (1, -1, *[1] * (inputs.dim() - 2))
        mean = module.running_mean.reshape(shape)
        std = torch.sqrt(module.running_var.reshape(shape) + module.eps)
        return (inputs - mean) / std

    def _updates(self, factors: Factors) -> tuple[Tensor | None, Tensor | None]:
        """The per-example gradients of ``gamma`` and ``beta``, ``(B, C)`` each."""
        spatial = list(range(2, factors.grads.dim()))
        weight_update = bias_update = None
        if _trainable(self.weight):
            weighted = factors.grads * self._normalized(factors.inputs)
            weight_update = weighted.sum(dim=spatial) if spatial else weighted
        if _trainable(self.bias):
            bias_update = factors.grads.sum(dim=spatial) if spatial else factors.grads
        return weight_update, bias_update

    def correction(
        self, new_input: Tensor, output_shape: torch.Size, factors: Factors, scale: Tensor
    ) -> Tensor | None:
        weight_update, bias_update = self._updates(factors)
        shape = (new_input.shape[0], -1, *[1] * (new_input.dim() - 2))
        total = None
        if weight_update is not None:
            total = self._normalized(new_input) * weight_update.reshape(shape)
        if bias_update is not None:
            bias_part = bias_update.reshape(shape)
            total = bias_part if total is None else total + bias_part
        return None if total is None else total * _per_example(scale, total)

    def squared_norm(self, factors: Factors) -> Tensor:
        total = factors.grads.new_zeros(factors.grads.shape[0])
        for update in self._updates(factors):
            if update is not None:
                total = total + update.square().sum(dim=1)
        return total


RULES: dict[type, type[ModuleRule]] = {
    nn.Conv1d: ConvRule,
    nn.Conv2d: ConvRule,
    nn.Linear: LinearRule,
    nn.BatchNorm1d: BatchNormRule,
    nn.BatchNorm2d: BatchNormRule,
}


def rule_for(module: nn.Module) -> ModuleRule:
    """The rule of the module's exact type (a subclass may compute something else)."""
    return RULES[type(module)](module)
