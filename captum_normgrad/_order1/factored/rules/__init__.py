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

A rule per module type, one file each beside :mod:`.base`: :class:`~.conv.ConvRule` (``nn.Conv1d``,
``nn.Conv2d``), :class:`~.linear.LinearRule`, :class:`~.batchnorm.BatchNormRule` (evaluation mode:
an affine map per channel). :data:`RULES` maps each module type to its rule, explicitly.
"""

from __future__ import annotations

from torch import nn

from captum_normgrad._order1.factored.rules.base import ModuleRule
from captum_normgrad._order1.factored.rules.batchnorm import BatchNormRule
from captum_normgrad._order1.factored.rules.conv import ConvRule
from captum_normgrad._order1.factored.rules.linear import LinearRule

__all__ = ["RULES", "rule_for"]


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
