"""The factored rule of ``nn.Linear``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from captum_normgrad._order1.factored.rules.base import (
    Factors,
    MatrixRule,
)

__all__ = ["LinearRule"]


class LinearRule(MatrixRule):
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
