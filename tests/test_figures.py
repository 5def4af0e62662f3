"""Figures: written, non-empty, and the heat lands where the map says."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from captum_normgrad.figures import (
    attribution_grid,
    draw_map,
    plot_deletion_insertion,
    save_figure,
)


def _rendered_axis(figure: Figure, axis) -> np.ndarray:
    """The RGB pixels inside ``axis`` after drawing with Agg."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[:, :, :3].astype(float)
    box = axis.get_window_extent()
    height = pixels.shape[0]
    top, bottom = int(height - box.y1) + 2, int(height - box.y0) - 2
    return pixels[top:bottom, int(box.x0) + 2 : int(box.x1) - 2]


def test_the_heat_is_where_the_map_peaks() -> None:
    # A grey 40 x 80 image and a 2 x 4 map hot only in its top-right cell: after upsampling, the
    # top-right of the drawing must be red (jet's top) and the bottom-left blue (jet's bottom).
    image = torch.full((3, 40, 80), 0.5)
    layer_map = torch.zeros(1, 1, 2, 4)
    layer_map[0, 0, 0, 3] = 1.0
    figure = Figure(figsize=(4, 2))
    axis = figure.subplots()
    draw_map(axis, image, layer_map)
    pixels = _rendered_axis(figure, axis)
    rows, columns = pixels.shape[:2]
    top_right = pixels[: rows // 5, -columns // 10 :].mean(axis=(0, 1))
    bottom_left = pixels[-rows // 5 :, : columns // 10].mean(axis=(0, 1))
    assert top_right[0] > top_right[2] + 50  # red over blue
    assert bottom_left[2] > bottom_left[0] + 50  # blue over red


def test_grid_layout_and_file(tmp_path) -> None:
    image = torch.rand(3, 32, 64)
    layer_names = ["shallow", "deep"]
    maps = {
        "NormGrad": [torch.rand(1, 1, 16, 32), torch.rand(1, 1, 4, 8)],
        "Grad-CAM": [torch.rand(1, 16, 32), torch.rand(4, 8)],
    }
    figure = attribution_grid(image, maps, layer_names, title="test")
    assert len(figure.axes) == 2 * 3
    titles = [axis.get_title() for axis in figure.axes[:3]]
    assert titles == ["input", "shallow (16x32)", "deep (4x8)"]
    assert [figure.axes[3 * row].get_ylabel() for row in range(2)] == ["NormGrad", "Grad-CAM"]
    path = save_figure(figure, tmp_path / "nested" / "grid.png")
    assert path.stat().st_size > 10_000
    assert matplotlib.image.imread(path).shape[2] in (3, 4)


def test_a_constant_map_is_drawn_as_such() -> None:
    figure = Figure()
    axis = figure.subplots()
    draw_map(axis, torch.rand(3, 8, 8), torch.zeros(1, 1, 2, 2), title="zero")
    assert "constant map" in axis.get_title()


@pytest.mark.parametrize(
    ("layer_map", "message"),
    [
        (torch.rand(2, 1, 4, 4), "one example"),
        (torch.tensor([[float("nan"), 1.0]]), "NaN"),
    ],
)
def test_bad_maps_are_refused(layer_map, message) -> None:
    figure = Figure()
    with pytest.raises(ValueError, match=message):
        draw_map(figure.subplots(), torch.rand(3, 8, 8), layer_map)


def test_grid_refuses_a_missing_layer_map() -> None:
    with pytest.raises(ValueError, match="1 maps for 2 layers"):
        attribution_grid(torch.rand(3, 8, 8), {"NormGrad": [torch.rand(2, 2)]}, ["a", "b"])


def test_grid_refuses_a_batched_image() -> None:
    with pytest.raises(ValueError, match="image must be"):
        attribution_grid(torch.rand(2, 3, 8, 8), {"m": [torch.rand(2, 2)]}, ["a"])


def test_curves_plot_areas_in_the_legend(tmp_path) -> None:
    # Two examples averaging to [1, 0.5, 0.25, 0.25, 0] at fractions 0, 1/4, ..., 1: trapezoids
    # 0.25 * (0.75 + 0.375 + 0.25 + 0.125) = 0.375; a flat curve at 0.25 has area 0.25.
    deletion = {
        "linear": torch.tensor([[1.0, 0.75, 0.5, 0.25, 0.0], [1.0, 0.25, 0.0, 0.25, 0.0]]),
        "flat": torch.full((5,), 0.25),
    }
    insertion = {"linear": torch.tensor([0.0, 0.5, 1.0])}
    figure = plot_deletion_insertion(deletion, insertion)
    deletion_axis, insertion_axis = figure.axes
    legend = [text.get_text() for text in deletion_axis.get_legend().get_texts()]
    assert legend == ["linear (0.375)", "flat (0.250)"]
    assert [t.get_text() for t in insertion_axis.get_legend().get_texts()] == ["linear (0.500)"]
    mean_line = deletion_axis.get_lines()[0].get_ydata()
    np.testing.assert_allclose(mean_line, [1.0, 0.5, 0.25, 0.25, 0.0])
    assert save_figure(figure, tmp_path / "curves.png").stat().st_size > 5_000


def test_curves_refuse_empty_input() -> None:
    with pytest.raises(ValueError, match="no curves"):
        plot_deletion_insertion({})
