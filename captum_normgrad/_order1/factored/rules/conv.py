"""The factored rule of ``nn.Conv1d`` and ``nn.Conv2d``, and the convolution pass 1 of the exact
Hessian-vector product differentiates twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_normgrad._order1.factored.rules.base import (
    Factors,
    MatrixRule,
    rows_scaled,
    trainable,
)

__all__ = ["ConvRule"]

# Costs relative to the layer's own convolution (same FLOPs), measured on ResNet-18/50 with 2 CPU
# threads: a Gram product runs at about half a convolution's FLOP rate; the grouped convolution plus
# the formed update (its weight-gradient kernel, shared by 1.5 passes on average) cost about 1.2.
_GRAM_SLOWDOWN = 2.0
_REPLACE_COST = 1.2


class ConvRule(MatrixRule):
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
        # own weights then run as one batched matrix product instead of a convolution grouped by
        # example, which is slow on CPU (measured in benchmarks/bench_order1.py; see the README).
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
        return trainable(self.weight) and not self._uses_gram(factors)

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
        weights = torch.addcmul(weight, per_example, rows_scaled(scale, per_example))
        weights = weights.reshape(update.shape)
        out = self._apply_update(new_input, weights, None)
        if self.bias is not None:
            bias = self.bias.detach().expand(examples, -1)
            if trainable(self.bias):
                bias_update = factors.cached(
                    "bias_update", lambda: self._bias_update(factors.grads)
                )
                bias = torch.addcmul(bias, bias_update, rows_scaled(scale, bias_update))
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
