"""What every pass of one call of order 1 reads: its frozen settings."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Order1Settings"]


@dataclass(frozen=True)
class Order1Settings:
    """What every pass of one call reads, the same for each mode.

    Attributes:
        learning_rate: the inner step, ``theta' = theta - learning_rate * grad l(theta)``; ``eps``
            for order 1, ``-eps`` for the adversarial map.
        h_scale: the finite difference's step is ``h = h_scale / ||grad l(theta')||_2``.
        exact_hvp: take ``H(theta) v`` exactly (a double backward, or forward-over-reverse under
            vmap) instead of by the central difference.
    """

    learning_rate: float
    h_scale: float
    exact_hvp: bool
