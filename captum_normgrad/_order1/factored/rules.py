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


def _trainable(parameter: Tensor | None) -> bool:
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


class _MatrixRule(ModuleRule):
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
        if _trainable(self.weight):
            if self._uses_gram(factors):
                gram = self._gram_matrix(new_input, factors.inputs)
                blocks = torch.bmm(gram, self._grads(factors))
                total = self._to_output(_scaled(blocks, scale), output_shape)
            else:
                update = self._update(factors)
                total = self._apply_update(new_input, _scaled(update, scale), output_shape)
        if _trainable(self.bias):
            bias_update = factors.cached("bias_update", lambda: self._bias_update(factors.grads))
            bias_part = self._bias_to_output(_scaled(bias_update, scale), output_shape)
            total = bias_part if total is None else total + bias_part
        return total

    def reads_only_derived(self, factors: Factors) -> bool:
        return not (_trainable(self.weight) and self._uses_gram(factors))

    def squared_norm(self, factors: Factors) -> Tensor:
        examples = factors.grads.shape[0]
        total = factors.grads.new_zeros(examples)
        if _trainable(self.weight):
            if "update" in factors.derived or not self._uses_gram(factors):
                products = self._update(factors).square()
            else:
                # ||sum_u g_u p_u^T||^2 = sum_{u,v} <g_u, g_v> <p_u, p_v>
                grads = self._grads(factors)
                gram = self._gram_matrix(factors.inputs, factors.inputs)
                products = gram * torch.bmm(grads, grads.transpose(1, 2))
            total = total + products.reshape(examples, -1).sum(dim=1)
        if _trainable(self.bias):
            bias_update = factors.cached("bias_update", lambda: self._bias_update(factors.grads))
            total = total + bias_update.square().sum(dim=1)
        return total


def _scaled(blocks: Tensor, scale: Tensor | None) -> Tensor:
    """``blocks`` with each example's rows times its scale (as they are without one)."""
    return blocks if scale is None else blocks * _rows_scaled(scale, blocks)


def _rows_scaled(scale: Tensor, blocks: Tensor) -> Tensor:
    """Each example's scale, repeated over its rows of ``blocks`` and shaped to broadcast."""
    per_row = blocks.shape[0] // scale.shape[0]
    scales = scale.to(blocks.dtype)
    if per_row > 1:
        scales = scales.repeat_interleave(per_row)
    return scales.reshape(-1, *[1] * (blocks.dim() - 1))


class LinearRule(_MatrixRule):
    """``nn.Linear`` on ``(B, *, in_features)``: the locations are the middle dimensions (one for a
    ``(B, in_features)`` input, the tokens of a sequence). The formed update is a second matrix
    product added to the shared one."""

    def __init__(self, module: nn.Linear) -> None:
        super().__init__(module)
        self.rows, self.columns = module.in_features, module.out_features

    def _uses_gram(self, factors: Factors) -> bool:
        locations = factors.grads[0].numel() // self.columns
        # Gram: L L (rows + columns); formed: L rows columns to form, L rows columns to apply.
        return locations * (self.rows + self.columns) < 2 * self.rows * self.columns

    def _patches(self, inputs: Tensor) -> Tensor:
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])

    def _grad_blocks(self, grads: Tensor) -> Tensor:
        return grads.reshape(grads.shape[0], -1, grads.shape[-1])

    def _to_output(self, blocks: Tensor, output_shape: torch.Size) -> Tensor:
        return blocks.reshape(output_shape)

    def _bias_update(self, grads: Tensor) -> Tensor:
        return self._grad_blocks(grads).sum(dim=1)

    def _bias_to_output(self, bias_update: Tensor, output_shape: torch.Size) -> Tensor:
        return bias_update.reshape(output_shape[0], *[1] * (len(output_shape) - 2), -1)

    def _weight_update(self, factors: Factors) -> Tensor:
        patches = self._patches(factors.inputs)
        return torch.bmm(patches.transpose(1, 2), self._grads(factors))  # (B, in, out) = D^T

    def _apply_update(self, new_input: Tensor, update: Tensor, output_shape: torch.Size) -> Tensor:
        return torch.bmm(self._patches(new_input), update).reshape(output_shape)


# Costs relative to the layer's own convolution (same FLOPs), measured on ResNet-18/50 with 2 CPU
# threads: a Gram product runs at about half a convolution's FLOP rate; the grouped convolution plus
# the formed update (its weight-gradient kernel, shared by 1.5 passes on average) cost about 1.2.
_GRAM_SLOWDOWN = 2.0
_REPLACE_COST = 1.2


class ConvRule(_MatrixRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` with numeric zero padding (a 1-D convolution is a 2-D one of
    height 1), a block per group.

    The Gram matrix comes from the patches (``F.unfold``), or, where cheaper, from the Gram matrix
    of the padded input's pixels summed over the kernel's offsets (a 3x3 kernel: 9x fewer
    products). The formed update replaces the shared convolution by one grouped by example
    (``groups = B x groups``): the layer at ``W + s_i D_i``, each example with its own weights.
    """

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
        self._choices: dict[torch.Size, tuple[bool, bool]] = {}
        # A 1x1 kernel without padding or groups is a matrix product per location: each example's
        # own weights then run as one batched matrix product, 2-5x faster on CPU than the
        # convolution grouped by example (ResNet-50's bottlenecks are two thirds 1x1).
        self.pointwise = (
            self.kernel_size == (1, 1) and tuple(self.padding) == (0, 0) and self.groups == 1
        )

    def _as_2d(self, tensor: Tensor) -> Tensor:
        return tensor.unsqueeze(2) if self.one_d else tensor

    def _strategy(self, factors: Factors) -> tuple[bool, bool]:
        """(use the Gram matrix, from pixels rather than patches), by a cost model in FLOPs per
        block: convolution ``L K C``; patch Gram ``L^2 (K + C)``; pixel Gram ``P^2 K / k + L^2 C``
        (``P`` padded pixels, ``k`` kernel positions)."""
        shape = factors.inputs.shape
        if shape not in self._choices:
            height, width = self._as_2d(factors.inputs).shape[2:]
            padded = (height + 2 * self.padding[0]) * (width + 2 * self.padding[1])
            locations = factors.grads[0].numel() // (self.columns * self.groups)
            offsets = self.kernel_size[0] * self.kernel_size[1]
            channels = self.rows // offsets
            convolution = locations * self.rows * self.columns
            patch = locations * locations * (self.rows + self.columns)
            pixel = padded * padded * channels + locations * locations * self.columns
            gram = _GRAM_SLOWDOWN * min(patch, pixel) < _REPLACE_COST * convolution
            self._choices[shape] = (gram, pixel < patch)
        return self._choices[shape]

    def _uses_gram(self, factors: Factors) -> bool:
        return self._strategy(factors)[0]

    def _gram_matrix(self, new_input: Tensor, inputs: Tensor) -> Tensor:
        if not self._choices.get(inputs.shape, (True, False))[1]:
            return super()._gram_matrix(new_input, inputs)
        return self._pixel_gram_matrix(new_input, inputs)

    def _pixel_gram_matrix(self, new_input: Tensor, inputs: Tensor) -> Tensor:
        """Sum over the kernel's offsets of the pixels' Gram matrix, read at the offset pixels of
        each pair of output locations: strided views, no patches."""
        padding = (self.padding[1], self.padding[1], self.padding[0], self.padding[0])
        new, old = (F.pad(self._as_2d(t), padding) for t in (new_input, inputs))
        examples, channels, height, width = old.shape
        blocks = examples * self.groups

        def pixels(t: Tensor) -> Tensor:
            return t.reshape(blocks, channels // self.groups, height * width)

        products = torch.bmm(pixels(new).transpose(1, 2), pixels(old))
        products = products.reshape(blocks, height, width, height, width)
        out_h = (height - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        out_w = (width - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        gram = None
        for i in range(self.kernel_size[0]):
            rows = slice(
                i * self.dilation[0],
                i * self.dilation[0] + (out_h - 1) * self.stride[0] + 1,
                self.stride[0],
            )
            for j in range(self.kernel_size[1]):
                cols = slice(
                    j * self.dilation[1],
                    j * self.dilation[1] + (out_w - 1) * self.stride[1] + 1,
                    self.stride[1],
                )
                term = products[:, rows, cols, rows, cols]
                gram = term if gram is None else gram + term
        return gram.reshape(blocks, out_h * out_w, out_h * out_w)

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

    def _to_output(self, blocks: Tensor, output_shape: torch.Size) -> Tensor:
        return blocks.transpose(1, 2).reshape(output_shape)

    def _bias_update(self, grads: Tensor) -> Tensor:
        return grads.reshape(*grads.shape[:2], -1).sum(dim=2)

    def _bias_to_output(self, bias_update: Tensor, output_shape: torch.Size) -> Tensor:
        return bias_update.reshape(*bias_update.shape, *[1] * (len(output_shape) - 2))

    def _sampled(self, inputs: Tensor) -> Tensor:
        """A pointwise layer's input at the locations it reads, ``(B, C, H', W')``."""
        return self._as_2d(inputs)[:, :, :: self.stride[0], :: self.stride[1]]

    def _weight_update(self, factors: Factors) -> Tensor:
        """``(B out_channels, in_channels / groups, kh, kw)``, by the weight-gradient kernel (a
        batched matrix product for a pointwise layer)."""
        module = self.module
        examples = factors.inputs.shape[0]
        if self.pointwise:
            grads = factors.grads.reshape(examples, module.out_channels, -1)
            pixels = self._sampled(factors.inputs).reshape(examples, module.in_channels, -1)
            update = torch.bmm(grads, pixels.transpose(1, 2))
            return update.reshape(examples * module.out_channels, module.in_channels, 1, 1)
        return torch.nn.grad.conv2d_weight(
            self._stacked(factors.inputs),
            (examples * module.out_channels, module.in_channels // self.groups, *self.kernel_size),
            self._stacked(factors.grads),
            self.stride,
            self.padding,
            self.dilation,
            examples * self.groups,
        )

    def replaces(self, factors: Factors) -> bool:
        return _trainable(self.weight) and not self._uses_gram(factors)

    rewrites_for_double_backward = True

    def twice_differentiable_output(self, new_input: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.detach()
        geometry = (self.stride, self.padding, self.dilation, self.groups)
        weight = self.weight.detach().reshape(*self.weight.shape[:2], *self.kernel_size)
        out = _ConvTwiceDifferentiable.apply(self._as_2d(new_input), weight, bias, geometry)
        return out.squeeze(2) if self.one_d else out

    def output_at(self, new_input: Tensor, factors: Factors, scale: Tensor) -> Tensor:
        """One convolution grouped by example, with ``W + s_i D_i`` for example ``i``."""
        examples = new_input.shape[0]
        update = self._update(factors)
        per_example = update.reshape(examples, -1, *update.shape[1:])
        weight = self.weight.detach().reshape(per_example.shape[1:])
        weights = torch.addcmul(weight, per_example, _rows_scaled(scale, per_example))
        weights = weights.reshape(update.shape)
        out = self._apply_update(new_input, weights, None)
        if self.bias is not None:
            bias = self.bias.detach().expand(examples, -1)
            if _trainable(self.bias):
                bias_update = factors.cached(
                    "bias_update", lambda: self._bias_update(factors.grads)
                )
                bias = torch.addcmul(bias, bias_update, _rows_scaled(scale, bias_update))
            out = out + self._bias_to_output(bias, out.shape)
        return out

    def _apply_update(
        self, new_input: Tensor, update: Tensor, output_shape: torch.Size | None
    ) -> Tensor:
        examples = new_input.shape[0]
        if self.pointwise:
            sampled = self._sampled(new_input)
            channels, height, width = sampled.shape[1:]
            pixels = sampled.reshape(examples, channels, height * width)
            out = torch.bmm(update.reshape(examples, -1, channels), pixels)
            out = out.reshape(examples, -1, height, width)
        else:
            out = F.conv2d(
                self._stacked(new_input),
                update,
                None,
                self.stride,
                self.padding,
                self.dilation,
                examples * self.groups,
            )
            out = out.reshape(examples, -1, *out.shape[2:])
        if output_shape is not None:
            return out.reshape(output_shape)
        return out.squeeze(2) if self.one_d else out


class _ConvTwiceDifferentiable(torch.autograd.Function):
    """``conv2d`` with a fixed weight, whose input gradient (:class:`_ConvInputGradient`) is
    differentiated again by one forward convolution. Autograd's own convolution double backward
    also computes a weight-shaped term (``conv(ggI, gO)``) that nothing asks for, and
    ``conv_transpose2d``'s backward is several times slower than a convolution on CPU."""

    @staticmethod
    def forward(
        ctx, inputs: Tensor, weight: Tensor, bias: Tensor | None, geometry: tuple
    ) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.geometry = geometry
        ctx.input_size = inputs.shape
        return F.conv2d(inputs, weight, bias, *geometry)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple:
        (weight,) = ctx.saved_tensors
        grad_input = _ConvInputGradient.apply(grad_output, weight, ctx.geometry, ctx.input_size)
        return grad_input, None, None, None


class _ConvInputGradient(torch.autograd.Function):
    """``d conv2d / d input`` applied to ``grad_output``: linear in it, so its own gradient is the
    convolution itself."""

    @staticmethod
    def forward(
        ctx, grad_output: Tensor, weight: Tensor, geometry: tuple, input_size: torch.Size
    ) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.geometry = geometry
        return torch.nn.grad.conv2d_input(input_size, weight, grad_output, *geometry)

    @staticmethod
    def backward(ctx, grad_grad_input: Tensor) -> tuple:
        (weight,) = ctx.saved_tensors
        return F.conv2d(grad_grad_input, weight, None, *ctx.geometry), None, None, None


class BatchNormRule(ModuleRule):
    """``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` in evaluation mode: ``x_hat * gamma + beta`` per
    channel, ``x_hat`` from the running statistics, so no example sees another. At an update it is
    one per-example affine map, ``x * a_i + b_i``."""

    def __init__(self, module: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__(module)
        self.weight, self.bias = module.weight, module.bias  # as for _MatrixRule

    def _statistics(self, dims: int) -> tuple[Tensor, Tensor]:
        module = self.module
        shape = (1, -1, *[1] * (dims - 2))
        std = torch.sqrt(module.running_var + module.eps)
        return module.running_mean.reshape(shape), std.reshape(shape)

    def _updates(self, factors: Factors) -> tuple[Tensor | None, Tensor | None]:
        """The per-example gradients of ``gamma`` and ``beta``, ``(B, C)`` each."""

        def compute() -> tuple[Tensor | None, Tensor | None]:
            grads = factors.grads
            spatial = list(range(2, grads.dim()))
            weight_update = bias_update = None
            grad_sums = grads.sum(dim=spatial) if spatial else grads
            if _trainable(self.weight):
                # sum_u g_u (x_u - mean) / std
                mean, std = self._statistics(2)
                flat = (grads.shape[0], grads.shape[1], -1)
                # (vecdot: a quarter of einsum's time here, forward and backward)
                products = torch.linalg.vecdot(grads.reshape(flat), factors.inputs.reshape(flat))
                weight_update = (products - mean * grad_sums) / std
            if _trainable(self.bias):
                bias_update = grad_sums
            return weight_update, bias_update

        if "updates" not in factors.derived:
            factors.derived["updates"] = compute()
        return factors.derived["updates"]

    def replaces(self, factors: Factors) -> bool:
        return True

    def reads_only_derived(self, factors: Factors) -> bool:
        return True

    def _affine(self, new_input: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        """``x_hat * gamma + beta`` as one ``addcmul`` on ``new_input`` (``x_hat`` from the running
        statistics), ``gamma`` and ``beta`` per channel, ``(C,)``, or per example, ``(B, C)``."""
        mean, std = self._statistics(new_input.dim())

        def per_channel(values: Tensor) -> Tensor:
            rows = values.shape[0] if values.dim() == 2 else 1
            return values.reshape(rows, *mean.shape[1:])

        slope = per_channel(gamma) / std
        return torch.addcmul(per_channel(beta) - mean * slope, new_input, slope)

    def output_at(self, new_input: Tensor, factors: Factors, scale: Tensor) -> Tensor:
        weight_update, bias_update = self._updates(factors)
        gamma, beta = self.weight.detach(), self.bias.detach()
        if weight_update is not None:
            gamma = torch.addcmul(gamma, weight_update, _rows_scaled(scale, weight_update))
        if bias_update is not None:
            beta = torch.addcmul(beta, bias_update, _rows_scaled(scale, bias_update))
        return self._affine(new_input, gamma, beta)

    rewrites_for_double_backward = True

    def twice_differentiable_output(self, new_input: Tensor) -> Tensor:
        """The affine map itself: autograd's batch-norm double backward is far costlier."""
        return self._affine(new_input, self.weight.detach(), self.bias.detach())

    def correction(
        self,
        new_input: Tensor,
        output_shape: torch.Size,
        factors: Factors,
        scale: Tensor | None = None,
    ) -> Tensor | None:
        """``x_hat * s dgamma + s dbeta`` per example."""
        weight_update, bias_update = self._updates(factors)
        if weight_update is None:
            if bias_update is None:
                return None
            spatial = [1] * (len(output_shape) - 2)
            return _scaled(bias_update, scale).reshape(*bias_update.shape, *spatial)
        if bias_update is None:
            beta = torch.zeros_like(weight_update)
        else:
            beta = _scaled(bias_update, scale)
        return self._affine(new_input, _scaled(weight_update, scale), beta)

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
