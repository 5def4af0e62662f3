"""The patch grid a recognised architecture lays its tokens on, read from the call itself.

A token count does not tell a grid's shape: a timm ViT built for 32 x 32 images (a 4 x 4 grid of
8-pixel patches) and given a 16 x 64 image with ``dynamic_img_size`` also makes 16 patch tokens, on
a 2 x 8 grid. Laid on the configured 4 x 4 grid, that map would look like any other map, and be
wrong. So the grid is never taken from the configuration where the call can say it: each
:class:`ArchitectureGrid` names a :class:`GridSource` (the patch embedding's convolution, whose
output is ``(N, C, h, w)``; a Swin block, whose input is ``(N, h, w, C)``), and
:func:`recording_grids`, entered by every method around its call, records the grid of *this* call
with a forward hook on it. A grid that is needed and was not recorded is an error, never a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from captum_normgrad.reshape import TokensToGrid, channels_last_to_first

if TYPE_CHECKING:
    from captum_normgrad._core.layouts.base import Layout

__all__ = [
    "ArchitectureGrid",
    "GridSource",
    "grid_of_conv_output",
    "grid_of_channels_last_input",
    "recording_grids",
]

Grid = tuple[int, int]


def grid_of_conv_output(args: tuple, output: Tensor) -> Grid:
    """A patch embedding's convolution: ``(N, C, h, w)`` out (per example under vmap: ``(C, h, w)``)."""
    return int(output.shape[-2]), int(output.shape[-1])


def grid_of_channels_last_input(args: tuple, output: object) -> Grid:
    """A module taking ``(N, h, w, C)`` (a timm Swin block); read before it runs."""
    return int(args[0].shape[-3]), int(args[0].shape[-2])


@dataclass(frozen=True)
class GridSource:
    """Where a call's grid is read: ``read(args, output)`` of ``module``'s forward, halved
    ``halvings`` times (rounding up, as Swin's patch merging pads odd sizes).

    ``from_input`` reads it before the module runs (``output`` is then ``None``): the layers
    inside the module see the grid before the module returns.
    """

    module: nn.Module
    read: Callable[[tuple, object], Grid]
    halvings: int = 0
    from_input: bool = False

    def grid(self, args: tuple, output: object) -> Grid:
        height, width = self.read(args, output)
        for _ in range(self.halvings):
            height, width = -(-height // 2), -(-width // 2)
        return height, width


class ArchitectureGrid(TokensToGrid):
    """The layout a recognised architecture gives a layer: ``(N, H, W, C)`` channels last, or
    tokens ``(N, T, C)`` (``num_prefix_tokens`` first) on the patch grid of the call.

    ``grid_size`` is the model's configured grid, used only by a model without a ``source`` (one
    that takes a single input size). Which axis holds the channels is never chosen here: the
    architecture says they are last.
    """

    def __init__(
        self,
        num_prefix_tokens: int,
        grid_size: Grid | None,
        model: str,
        source: GridSource | None = None,
    ) -> None:
        super().__init__(num_prefix_tokens, grid_size)
        self.model = model
        self.source = source
        self.call_grid: Grid | None = None  # set by recording_grids during a call

    def record(self, module: nn.Module, args: tuple, output: object = None) -> None:
        """The forward (or pre-forward) hook :func:`recording_grids` puts on ``source.module``."""
        self.call_grid = self.source.grid(args, output)

    def __call__(self, tensor: Tensor) -> Tensor:
        if tensor.dim() == 2:
            return tensor  # pooled (N, C): one axis, the channels
        if tensor.dim() == 4 and self.num_prefix_tokens == 0:
            return channels_last_to_first(tensor)
        if tensor.dim() != 3:
            raise ValueError(
                f"a {self.model} layer laid out as tokens (N, T, C) or (N, H, W, C) gave shape "
                f"{tuple(tensor.shape)}; pass a reshape_transform"
            )
        grid = self._grid()
        patches = tensor.shape[1] - self.num_prefix_tokens
        if grid is not None and grid[0] * grid[1] != patches:
            raise ValueError(
                f"the {self.model} tokens of shape {tuple(tensor.shape)} hold {patches} patch "
                f"tokens after {self.num_prefix_tokens} prefix token(s), not the "
                f"{grid[0]} x {grid[1]} patch grid of this call; pass "
                f"reshape_transform=TokensToGrid(num_prefix_tokens=..., grid_size=(h, w))"
            )
        return TokensToGrid(self.num_prefix_tokens, grid)(tensor)

    def _grid(self) -> Grid | None:
        if self.source is None:
            return self.grid_size
        if self.call_grid is None:
            raise RuntimeError(
                f"internal error: the {self.model} token layout was used outside a call that "
                "recorded its patch grid (captum_normgrad._core.layouts.recording_grids); please "
                "report it. Meanwhile pass reshape_transform=TokensToGrid(num_prefix_tokens="
                f"{self.num_prefix_tokens}, grid_size=(h, w))"
            )
        return self.call_grid

    def frozen(self) -> TokensToGrid:
        """This call's layout, fixed: for a gradient laid out after later forwards (the monitor)."""
        if self.source is None:
            return self
        return ArchitectureGrid(self.num_prefix_tokens, self._grid(), self.model)

    def __repr__(self) -> str:
        grid = "read from the call" if self.source is not None else self.grid_size
        return (
            f"ArchitectureGrid({self.model}: num_prefix_tokens={self.num_prefix_tokens}, "
            f"grid_size={grid})"
        )


def _grids(layouts: Sequence[Layout]) -> list[ArchitectureGrid]:
    sides = [side for layout in layouts for side in (layout, layout.input_side) if side]
    return [
        side.transform
        for side in sides
        if isinstance(side.transform, ArchitectureGrid) and side.transform.source is not None
    ]


@contextmanager
def recording_grids(layouts: Sequence[Layout]) -> Iterator[None]:
    """Record, for the duration of one call, the patch grid each layout's tokens lie on.

    The hooks are registered on entry (before any capture hook, so the grid is known when a layer
    after the patch embedding is reached) and removed on exit, where each grid goes back to what it
    was (a call inside another one, the monitor around a method's call, leaves the outer's grid).
    """
    grids = _grids(layouts)
    before = [grid.call_grid for grid in grids]
    handles = []
    try:
        for grid in grids:
            module = grid.source.module
            register = (
                module.register_forward_pre_hook
                if grid.source.from_input
                else module.register_forward_hook
            )
            handles.append(register(grid.record))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for grid, call_grid in zip(grids, before):
            grid.call_grid = call_grid
