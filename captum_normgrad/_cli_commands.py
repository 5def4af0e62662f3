"""The ``compare`` and ``explain`` commands: maps of several methods at several depths, one figure.

``evaluate`` lives in :mod:`captum_normgrad._cli_evaluate`. Each command returns the process's exit
status and raises :class:`~captum_normgrad._cli_inputs.CliError` for a user mistake.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from captum_normgrad import data
from captum_normgrad._cli_inputs import (
    BUNDLED_MODEL,
    CliError,
    LoadedModel,
    default_layer_names,
    load_model,
    read_image,
    resolve_layers,
    resolve_target,
)
from captum_normgrad._cli_methods import METHODS, build_method
from captum_normgrad._cli_table import format_table
from captum_normgrad.figures import attribution_grid, save_figure
from captum_normgrad.metrics import class_selectivity, pointing_game

__all__ = ["attribute_or_fail", "run_compare", "run_explain"]


def attribute_or_fail(
    method: str, model: nn.Module, layers: list[nn.Module], inputs: Tensor, targets: Tensor
) -> tuple[list[Tensor], float]:
    """A method's maps and the seconds they took; the library's own error becomes one line."""
    start = time.perf_counter()
    try:
        maps = build_method(method, model, layers).attribute(inputs, target=targets)
    except (ValueError, TypeError, RuntimeError) as error:
        raise CliError(f"method {method!r}: {error}") from error
    return [layer_map.detach() for layer_map in maps], time.perf_counter() - start


def _predict(model: LoadedModel, inputs: Tensor) -> Tensor:
    try:
        with torch.no_grad():
            return model.module(inputs).softmax(dim=1)
    except RuntimeError as error:
        raise CliError(f"{model.name} cannot run on this input: {error}") from error


def run_compare(args: argparse.Namespace) -> int:
    """Every method at several depths on a bundled two-object composite: figure + table."""
    model = load_model(BUNDLED_MODEL)
    composite = data.load_composite(args.left, args.right)
    layer_names = args.layers or default_layer_names(model)
    layers = resolve_layers(model, layer_names)
    # Both halves' classes as targets: the pointing game checks each map lands on its own half,
    # and selectivity compares the two maps.
    inputs = composite.input.unsqueeze(0).repeat(2, 1, 1, 1)
    targets = composite.labels
    left_name, right_name = (model.class_names[int(label)] for label in targets)
    print(
        f"{composite.name}: left '{left_name}' ({int(targets[0])}), right '{right_name}' "
        f"({int(targets[1])}); model {model.name}; layers {' '.join(layer_names)}"
    )
    rows, figure_maps = [], {}
    for method in args.methods:
        maps, seconds = attribute_or_fail(method, model.module, layers, inputs, targets)
        figure_maps[METHODS[method].label] = [layer_map[0] for layer_map in maps]
        for name, layer_map in zip(layer_names, maps):
            hits = pointing_game(layer_map, masks=composite.masks)
            selectivity = class_selectivity(layer_map[:1], layer_map[1:])
            rows.append(
                {
                    "method": METHODS[method].label,
                    "layer": name,
                    "seconds": seconds,
                    "pointing": f"{int(hits.sum())}/{hits.numel()}",
                    "selectivity": float(selectivity[0]),
                }
            )
    figure = attribution_grid(
        composite.image, figure_maps, layer_names, title=f"{composite.name}: maps for '{left_name}'"
    )
    path = save_figure(figure, Path(args.out) / "compare.png", dpi=args.dpi)
    print(format_table(rows))
    print(
        "seconds: the method's call for all layers and both targets; pointing: maps whose maximum "
        "falls on their own half (higher is better); selectivity: rank correlation of the two "
        "classes' maps (lower is more class-selective)"
    )
    print(f"figure: {path}")
    return 0


def run_explain(args: argparse.Namespace) -> int:
    """Maps of the chosen methods at the chosen layers for the user's own image."""
    model = load_model(args.model, args.weights, args.num_classes)
    image = data.center_crop(read_image(args.image), args.image_size)
    layer_names = args.layers or default_layer_names(model)
    layers = resolve_layers(model, layer_names)
    target = resolve_target(model, args.target)
    inputs = model.prepare(image)
    probabilities = _predict(model, inputs)[0]
    top = probabilities.topk(min(5, probabilities.numel()))
    predictions = ", ".join(
        f"{model.class_names[int(index)]} ({int(index)}) {float(p):.2f}"
        for p, index in zip(top.values, top.indices)
    )
    print(f"{args.image}: top predictions {predictions}")
    target = int(top.indices[0]) if target is None else target
    probability = float(probabilities[target])
    print(f"explaining class '{model.class_names[target]}' ({target}), p={probability:.3f}")
    targets = torch.tensor([target])
    rows, figure_maps = [], {}
    for method in args.methods:
        maps, seconds = attribute_or_fail(method, model.module, layers, inputs, targets)
        figure_maps[METHODS[method].label] = [layer_map[0] for layer_map in maps]
        rows.append({"method": METHODS[method].label, "seconds": seconds})
    title = f"{Path(args.image).name}: maps for '{model.class_names[target]}' ({model.name})"
    figure = attribution_grid(image, figure_maps, layer_names, title=title)
    path = save_figure(
        figure, Path(args.out) / f"explain_{Path(args.image).stem}.png", dpi=args.dpi
    )
    print(format_table(rows))
    print(f"figure: {path}")
    return 0
