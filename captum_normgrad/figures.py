"""Figures: maps blended over the photo in a methods x layers grid, and deletion / insertion curves.

Drawing goes through ``captum.attr.visualization.visualize_image_attr`` (the blended heat map), so
NormGrad's maps look exactly like any Captum attribution. Each layer map is upsampled to the image
with ``LayerAttribution.interpolate`` (bilinear) and min-max normalised per map first: maps at different
depths have scales many orders apart, and Captum's colour scale is relative anyway.

Figures are built with matplotlib's object-oriented API (no ``pyplot``, no global backend state), so
they render with Agg on a headless machine and display in a notebook as the cell's value. Tensors come
in; numpy appears only here, at the plotting edge.

Example:
    >>> from captum_normgrad.figures import attribution_grid, save_figure
    >>> figure = attribution_grid(image, {"NormGrad": maps, "Grad-CAM": cams}, layer_names)
    >>> save_figure(figure, "normgrad_out/grid.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerAttribution
from captum.attr import visualization as captum_visualization
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["attribution_grid", "draw_map", "plot_deletion_insertion", "save_figure"]


def _image_array(image: Tensor) -> np.ndarray:
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"image must be (3, H, W) (or (1, 3, H, W)) in [0, 1], got {tuple(image.shape)}"
        )
    return image.detach().float().clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0).cpu().numpy()


def _map_at_image(layer_map: Tensor, size: tuple[int, int]) -> Tensor:
    """One example's map, as ``(H, W)`` at the image's size, min-max normalised to [0, 1]."""
    squeezed = layer_map.detach().float()
    while squeezed.dim() > 2 and squeezed.shape[0] == 1:
        squeezed = squeezed[0]
    if squeezed.dim() != 2:
        raise ValueError(
            "a map must be one example's 2-D map, (h, w), (1, h, w) or (1, 1, h, w); got shape "
            f"{tuple(layer_map.shape)}"
        )
    if not torch.isfinite(squeezed).all():
        raise ValueError("the map contains NaN or infinite values")
    upsampled = LayerAttribution.interpolate(squeezed[None, None], size, "bilinear")[0, 0]
    low, high = upsampled.min(), upsampled.max()
    return (upsampled - low) / (high - low) if high > low else torch.zeros_like(upsampled)


def draw_map(
    axis: Axes,
    image: Tensor,
    layer_map: Tensor,
    title: str | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    outlier_perc: float = 1.0,
) -> None:
    """Blend one map over the (greyed) image on ``axis`` with Captum's ``visualize_image_attr``.

    Args:
        axis: a matplotlib axis.
        image: ``(3, H, W)`` in [0, 1], the view the model saw.
        layer_map: one example's map at any resolution (``(h, w)``, ``(1, h, w)`` or
            ``(1, 1, h, w)``); only its positive part is drawn (NormGrad maps are non-negative;
            for Grad-CAM that is its ReLU).
        title: the axis title.
        cmap: the heat map's colour map.
        alpha: the heat map's opacity over the image.
        outlier_perc: Captum's saturation: the top ``outlier_perc`` percent of the map's mass is
            drawn at full colour, so one extreme pixel cannot wash out the rest.
    """
    image_array = _image_array(image)
    normalised = _map_at_image(layer_map, image_array.shape[:2])
    if normalised.max() <= 0:
        # A constant map ranks nothing (and Captum cannot scale it): show the grey photo alone.
        axis.imshow(image_array.mean(axis=2), cmap="gray", vmin=0, vmax=1)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(f"{title}\n(constant map)" if title else "(constant map)")
        return
    captum_visualization.visualize_image_attr(
        normalised[:, :, None].cpu().numpy(),
        image_array,
        method="blended_heat_map",
        sign="positive",
        plt_fig_axis=(axis.figure, axis),
        outlier_perc=outlier_perc,
        cmap=cmap,
        alpha_overlay=alpha,
        title=title,
        use_pyplot=False,
    )


def _short_name(layer_name: str, width: int = 24) -> str:
    """A column title that fits its cell: a long dotted module name (a transformer's
    ``encoder.layers.encoder_layer_11.ln_1``) keeps its last parts, ``...``-prefixed."""
    if len(layer_name) <= width:
        return layer_name
    parts = layer_name.split(".")
    kept = parts[-1]
    for part in reversed(parts[:-1]):
        if len(part) + 1 + len(kept) > width - 3:
            break
        kept = f"{part}.{kept}"
    return f"...{kept}"


def attribution_grid(
    image: Tensor,
    maps: Mapping[str, Sequence[Tensor]],
    layer_names: Sequence[str],
    title: str | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    cell_height: float = 1.8,
) -> Figure:
    """The paper's Figure 1 layout: one row per method, one column per depth, maps over the photo.

    Args:
        image: ``(3, H, W)`` in [0, 1], the view the model saw (``Sample.image``).
        maps: method name -> its maps, one per entry of ``layer_names``, each one example's map at
            its layer's resolution (e.g. ``LayerNormGrad(...).attribute(x)`` for a batch of one).
        layer_names: the column titles (with each map's resolution appended).
        title: the figure's title, e.g. the image and the target class.
        cmap: the heat maps' colour map.
        alpha: the heat maps' opacity.
        cell_height: the height of one cell in inches (the width follows the image's aspect).

    Returns:
        A matplotlib ``Figure``: column 0 shows the photo, then one column per layer.

    Raises:
        ValueError: a method has a different number of maps than there are layers.
    """
    if not maps:
        raise ValueError("maps is empty: give at least one method's maps")
    for method, method_maps in maps.items():
        if len(method_maps) != len(layer_names):
            raise ValueError(
                f"method {method!r} has {len(method_maps)} maps for {len(layer_names)} layers"
            )
    height, width = image.shape[-2:]
    cell_width = cell_height * width / height
    rows, columns = len(maps), len(layer_names) + 1
    figure = Figure(figsize=(cell_width * columns, cell_height * rows + (0.5 if title else 0.2)))
    axes = figure.subplots(rows, columns, squeeze=False)
    for row, (method, method_maps) in enumerate(maps.items()):
        photo_axis = axes[row][0]
        photo_axis.set_xticks([])
        photo_axis.set_yticks([])
        photo_axis.set_ylabel(method, fontsize=10)
        if row == 0:
            photo_axis.imshow(_image_array(image))
            photo_axis.set_title("input", fontsize=9)
        else:
            for spine in photo_axis.spines.values():
                spine.set_visible(False)
        for column, (name, layer_map) in enumerate(zip(layer_names, method_maps), start=1):
            resolution = "x".join(str(side) for side in layer_map.shape[-2:])
            draw_map(axes[row][column], image, layer_map, None, cmap, alpha)
            if row == 0:
                axes[row][column].set_title(f"{_short_name(name)} ({resolution})", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return figure


def plot_deletion_insertion(
    deletion: Mapping[str, Tensor],
    insertion: Mapping[str, Tensor] | None = None,
    title: str | None = None,
) -> Figure:
    """Mean deletion (and insertion) curves per method, with the area under each in the legend.

    Args:
        deletion: method name -> ``(N, n_steps + 1)`` curves (or one ``(n_steps + 1,)`` curve), as
            returned by ``captum_normgrad.metrics.deletion_curve``. Lower area is better.
        insertion: the same for insertion; higher area is better.
        title: the figure's title.

    Returns:
        A matplotlib ``Figure`` with one panel per kind of curve.
    """
    panels = [("deletion (lower is better)", deletion)]
    if insertion is not None:
        panels.append(("insertion (higher is better)", insertion))
    figure = Figure(figsize=(4.5 * len(panels), 3.4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (panel_title, curves) in zip(axes, panels):
        if not curves:
            raise ValueError(f"no curves given for {panel_title.split()[0]}")
        for method, method_curves in curves.items():
            mean_curve = method_curves.detach().float().reshape(-1, method_curves.shape[-1])
            mean_curve = mean_curve.mean(dim=0).cpu()
            if mean_curve.numel() < 2:
                raise ValueError(f"the curve of {method!r} has fewer than two points")
            fractions = torch.linspace(0, 1, mean_curve.numel())
            area = float(torch.trapezoid(mean_curve, fractions))
            axis.plot(fractions.numpy(), mean_curve.numpy(), label=f"{method} ({area:.3f})")
        axis.set_xlabel("fraction of pixels")
        axis.set_ylabel("target score")
        axis.set_title(panel_title, fontsize=10)
        axis.set_xlim(0, 1)
        axis.legend(fontsize=8, title="method (area)", title_fontsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``figure`` to ``path`` (format from the suffix), creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
