"""Reshape transforms: a transformer's activation laid out as ``(N, C, *S)``, channels first.

NormGrad takes norms over channels (dim 1) at every location. A vision transformer's block outputs
tokens ``(N, T, C)`` and a Swin stage or a ConvNeXt block's inside ``(N, H, W, C)``: taken as they are,
the norm would run over tokens or rows. A ``reshape_transform`` (the name and meaning
pytorch-grad-cam's users know) moves the channels to dim 1 and lays tokens on their grid; every
method applies it to the activation and to its gradient alike, before the norms, so the maps come
out ``(N, 1, H, W)`` as for a CNN.

The transforms are views and permutes wherever possible (no copy) and differentiable, so they also
serve ``create_graph=True``. They are channel-count agnostic: the same transform lays a one-channel
score per token on the grid.

Example:
    >>> from captum_normgrad import LayerNormGrad, TokensToGrid
    >>> normgrad = LayerNormGrad(model, model.blocks[6], reshape_transform=TokensToGrid(1))
    >>> normgrad.attribute(images, target=281).shape     # a 224-pixel ViT-B/16: 14 x 14 tokens
    torch.Size([2, 1, 14, 14])
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["TokensToGrid", "channels_last_to_first", "tokens_to_grid"]


def channels_last_to_first(activation: Tensor) -> Tensor:
    """``(N, *S, C) -> (N, C, *S)``: Swin stages, ConvNeXt block internals, NHWC layers (a view).

    Args:
        activation: batch first, channels last, at least 3-D.

    Returns:
        The same values as a permuted view, channels at dim 1.
    """
    if activation.dim() < 3:
        raise ValueError(
            "channels_last_to_first needs an activation with at least one location dimension, "
            f"(N, *S, C); got shape {tuple(activation.shape)}"
        )
    return activation.movedim(-1, 1)


def tokens_to_grid(
    tokens: Tensor,
    num_prefix_tokens: int = 1,
    grid_size: tuple[int, int] | None = None,
) -> Tensor:
    """``(N, T, C) -> (N, C, h, w)``: a ViT's tokens, prefix tokens dropped, laid on the patch grid.

    Args:
        tokens: batch first, ``T = num_prefix_tokens + h * w`` tokens, channels last.
        num_prefix_tokens: tokens before the patch tokens that sit on no patch: the class token (1
            in torchvision's and timm's ViTs), DeiT's distillation token (2), registers (1 + 4 in
            "Vision Transformers Need Registers").
        grid_size: ``(h, w)``; by default the square grid the patch tokens fill.

    Returns:
        The patch tokens as ``(N, C, h, w)`` (a permuted view of a slice: no copy).

    Raises:
        ValueError: a tensor that is not 3-D, or a token count that does not fit the grid.
    """
    if tokens.dim() != 3:
        raise ValueError(
            f"tokens_to_grid needs tokens (N, T, C); got shape {tuple(tokens.shape)}"
            + (". For (N, H, W, C) use channels_last_to_first" if tokens.dim() == 4 else "")
        )
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise TypeError(f"num_prefix_tokens must be an int, got {num_prefix_tokens!r}")
    patch_tokens = tokens.shape[1] - num_prefix_tokens
    if num_prefix_tokens < 0 or patch_tokens <= 0:
        raise ValueError(
            f"num_prefix_tokens={num_prefix_tokens} does not fit {tokens.shape[1]} tokens "
            f"(shape {tuple(tokens.shape)})"
        )
    if grid_size is None:
        side = math.isqrt(patch_tokens)
        if side * side != patch_tokens:
            raise ValueError(
                f"{patch_tokens} patch tokens (shape {tuple(tokens.shape)} minus "
                f"{num_prefix_tokens} prefix token(s)) do not fill a square grid; pass "
                "grid_size=(h, w), or the right num_prefix_tokens"
            )
        grid_size = (side, side)
    height, width = grid_size
    if height * width != patch_tokens:
        raise ValueError(
            f"grid_size={tuple(grid_size)} holds {height * width} tokens, but shape "
            f"{tuple(tokens.shape)} has {patch_tokens} after {num_prefix_tokens} prefix token(s)"
        )
    return tokens[:, num_prefix_tokens:].unflatten(1, (height, width)).movedim(-1, 1)


class TokensToGrid:
    """:func:`tokens_to_grid` with its settings bound: pass an instance as ``reshape_transform``.

    Being a class (not a lambda), it shows its settings in error messages, and the methods know
    which tokens it drops: a map whose patch tokens got no gradient while the prefix tokens did
    (the last block of a ViT whose head reads only the class token) is refused instead of returned
    as zeros.

    Args:
        num_prefix_tokens: as for :func:`tokens_to_grid`.
        grid_size: as for :func:`tokens_to_grid`.
    """

    def __init__(self, num_prefix_tokens: int = 1, grid_size: tuple[int, int] | None = None):
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = None if grid_size is None else tuple(grid_size)

    def __call__(self, tokens: Tensor) -> Tensor:
        return tokens_to_grid(tokens, self.num_prefix_tokens, self.grid_size)

    def __repr__(self) -> str:
        return (
            f"TokensToGrid(num_prefix_tokens={self.num_prefix_tokens}, grid_size={self.grid_size})"
        )
