"""``captum-normgrad compare``: every method at several depths on a bundled two-object composite.

Writes the figure (the paper's Figure 1 layout) and prints, per method and layer, the pointing-game
hits and the class selectivity (and, with ``--repeats N``, the median seconds of N warm calls).
Heavy imports happen inside :func:`run`, so ``--help`` does not pay for torch.
"""

from __future__ import annotations

import argparse

from captum_normgrad._core.asset_names import EFFICIENTNET_LITE0_LAYERS, SAMPLE_PHOTOS
from captum_normgrad.cli._options import add_common_options, add_repeats_option

__all__ = ["COMPARE_METHODS", "add_parser", "run"]

# The paper's Figure 1 rows, then the authors' later selective variant.
COMPARE_METHODS = ["gradcam", "normgrad", "order1", "adversarial", "selective"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``compare`` and its options."""
    compare = commands.add_parser(
        "compare", help="all methods x several depths on a bundled two-object composite"
    )
    compare.add_argument("--left", default="chelsea", choices=SAMPLE_PHOTOS)
    compare.add_argument("--right", default="coffee", choices=SAMPLE_PHOTOS)
    add_common_options(compare, COMPARE_METHODS, " ".join(EFFICIENTNET_LITE0_LAYERS))
    add_repeats_option(compare)
    compare.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Every method at several depths on a bundled two-object composite: table, then figure."""
    from captum_normgrad.cli._outputs import check_output_folder, writing

    out = check_output_folder(args.out)  # before any computation

    from captum_normgrad import data
    from captum_normgrad.cli._inputs import default_layer_names, probe_layers, resolve_layers
    from captum_normgrad.cli._methods import METHODS, attribute_or_fail, median_seconds
    from captum_normgrad.cli._models import BUNDLED_MODEL, load_model
    from captum_normgrad.cli._table import format_table
    from captum_normgrad.figures import attribution_grid, save_figure
    from captum_normgrad.metrics import class_selectivity, pointing_game

    model = load_model(BUNDLED_MODEL)
    composite = data.load_composite(args.left, args.right)
    layer_names = args.layers or default_layer_names(model)
    _, runs = probe_layers(model, composite.input.unsqueeze(0))
    layers = resolve_layers(model, layer_names, runs)
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
        maps = attribute_or_fail(method, model.module, layers, inputs, targets)
        figure_maps[METHODS[method].label] = [layer_map[0] for layer_map in maps]
        timing = {}
        if args.repeats:
            timing["median_s"] = median_seconds(
                method, model.module, layers, inputs, targets, args.repeats
            )
        for name, layer_map in zip(layer_names, maps):
            hits = pointing_game(layer_map, masks=composite.masks)
            selectivity = class_selectivity(layer_map[:1], layer_map[1:])
            rows.append(
                {
                    "method": METHODS[method].label,
                    "layer": name,
                    **timing,
                    "pointing": f"{int(hits.sum())}/{hits.numel()}",
                    "selectivity": float(selectivity[0]),
                }
            )
    # The table first: it is the result, and a figure that fails to save must not take it along.
    print(format_table(rows))
    print(
        "pointing: maps whose maximum falls on their own half (higher is better); selectivity: "
        "rank correlation of the two classes' maps (lower is more class-selective)"
        + (
            f"; median_s: median seconds of {args.repeats} warm call(s) of the method (all layers, both "
            "targets), after a warm-up call"
            if args.repeats
            else ""
        )
    )
    figure = attribution_grid(
        composite.image, figure_maps, layer_names, title=f"{composite.name}: maps for '{left_name}'"
    )
    with writing(out / "compare.png"):
        path = save_figure(figure, out / "compare.png", dpi=args.dpi)
    print(f"figure: {path}")
    return 0
