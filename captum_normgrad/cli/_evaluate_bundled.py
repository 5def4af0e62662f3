"""``evaluate`` on the bundled photos and composites: the metrics of every method and layer, one table.

- Faithfulness, on the six single photos explained for their label: deletion and insertion curves
  (:func:`captum_normgrad.metrics.deletion_curve` / ``insertion_curve``) and their areas. The curves
  of every method at the deepest layer are drawn.
- Localisation and selectivity, on the composites with one example per half (that half's class as
  the target, its mask as ground truth): the pointing game and class selectivity from
  :func:`captum_normgrad.metrics.evaluate_attributions`.

The two sets of numbers are merged into one row per method and layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from captum_normgrad import data
from captum_normgrad.cli._errors import CliError
from captum_normgrad.cli._inputs import probe_layers, resolve_layers
from captum_normgrad.cli._methods import METHODS, attribute_or_fail, build_method
from captum_normgrad.cli._models import BUNDLED_MODEL, load_model
from captum_normgrad.cli._outputs import writing
from captum_normgrad.cli._table import format_table, write_csv
from captum_normgrad.figures import plot_deletion_insertion, save_figure
from captum_normgrad.metrics import (
    area_under_curve,
    deletion_curve,
    evaluate_attributions,
    insertion_curve,
)

__all__ = ["evaluate_bundled"]

# Small chunks run faster than large ones on a CPU (cache), and bound the memory.
_CHUNK_SIZE = 16


def _photo_batch() -> tuple[torch.Tensor, torch.Tensor]:
    samples = data.load_samples()
    return torch.stack([sample.input for sample in samples]), torch.tensor(
        [sample.label for sample in samples]
    )


def _composite_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One example per half of every composite: the image, that half's class, that half's mask."""
    composites = data.load_composites()
    images = torch.cat([c.input.unsqueeze(0).expand(2, -1, -1, -1) for c in composites])
    return (
        images,
        torch.cat([c.labels for c in composites]),
        torch.cat([c.masks for c in composites]),
    )


def evaluate_bundled(args: argparse.Namespace, layer_names: list[str], out: Path) -> int:
    """Metrics for every method and layer over the bundled photos and composites."""
    model = load_model(BUNDLED_MODEL)
    images, labels = _photo_batch()
    _, runs = probe_layers(model, images[:1])
    layers = resolve_layers(model, layer_names, runs)
    rows: dict[tuple[str, str], dict[str, object]] = {}
    curves: dict[str, dict[str, torch.Tensor]] = {"deletion": {}, "insertion": {}}
    progress = tqdm(args.methods, desc="deletion / insertion", unit="method")
    for method in progress:
        label = METHODS[method].label
        progress.set_postfix_str(label)
        maps = attribute_or_fail(method, model.module, layers, images, labels)
        for name, layer_map in zip(layer_names, maps):
            deleted = deletion_curve(
                model.module, images, layer_map, labels, args.steps, chunk_size=_CHUNK_SIZE
            )
            inserted = insertion_curve(
                model.module, images, layer_map, labels, args.steps, chunk_size=_CHUNK_SIZE
            )
            rows[label, name] = {
                "method": label,
                "layer": name,
                "deletion_auc": float(area_under_curve(deleted).mean()),
                "insertion_auc": float(area_under_curve(inserted).mean()),
            }
        # The figure shows the last (deepest) layer's curves.
        curves["deletion"][label], curves["insertion"][label] = deleted, inserted
    methods = {METHODS[m].label: build_method(m, model.module, layers) for m in args.methods}
    try:
        table = evaluate_attributions(
            model.module,
            methods,
            [_composite_batch()],
            ["pointing_game", "selectivity"],
            ground_truth="masks",
            chunk_size=_CHUNK_SIZE,
        )
    except (ValueError, TypeError, RuntimeError) as error:
        raise CliError(f"evaluation failed: {error}") from error
    for row in table.rows:
        rows[row["method"], row["layer"]].update(
            pointing_game=row["pointing_game"], selectivity=row["selectivity"]
        )
    table_rows = list(rows.values())
    # The table first: it is the result, and a file that fails to save must not take it along.
    print(format_table(table_rows))
    print(
        f"deletion_auc (lower is better) and insertion_auc (higher) over {len(labels)} photos, "
        f"{args.steps} steps; pointing_game (higher) and selectivity (rank correlation with the "
        "second-best class's map, lower is more selective) over both halves of "
        f"{len(data.COMPOSITE_PAIRS)} composites"
    )
    with writing(out / "evaluate.csv"):
        csv_path = write_csv(table_rows, out / "evaluate.csv")
    figure = plot_deletion_insertion(
        curves["deletion"],
        curves["insertion"],
        title=f"{len(labels)} bundled photos, layer {layer_names[-1]} ({model.name})",
    )
    with writing(out / "evaluate_curves.png"):
        figure_path = save_figure(figure, out / "evaluate_curves.png", dpi=args.dpi)
    print(f"table: {csv_path}\nfigure: {figure_path}")
    return 0
