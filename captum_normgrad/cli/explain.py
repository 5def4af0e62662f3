"""``captum-normgrad explain``: maps of several methods at several depths for the user's own image.

The model is the bundled EfficientNet-Lite0, a torchvision or timm architecture with a local state
dict, or a local Hugging Face folder (:mod:`captum_normgrad.cli._models`); the target is a class
index, an exact class name or the top-1 prediction. Every path the user gave is checked before the
model is loaded; heavy imports happen inside :func:`run`, so ``--help`` does not pay for torch.
"""

from __future__ import annotations

import argparse

from captum_normgrad._core.asset_names import BUNDLED_MODEL, EFFICIENTNET_LITE0_LAYERS
from captum_normgrad.cli._options import add_common_options, add_repeats_option, positive_int

__all__ = ["EXPLAIN_METHODS", "add_parser", "run"]

EXPLAIN_METHODS = ["gradcam", "normgrad", "selective"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``explain`` and its options."""
    explain = commands.add_parser("explain", help="maps for your own image")
    explain.add_argument("--image", required=True, help="an image file (PNG, JPEG, ...)")
    explain.add_argument(
        "--target", help="class index or exact class name (default: the top-1 prediction)"
    )
    explain.add_argument(
        "--model",
        default=BUNDLED_MODEL,
        help=f"{BUNDLED_MODEL} (bundled, pretrained), a torchvision architecture name, e.g. "
        "resnet50, vit_b_16, swin_t, convnext_tiny (transformer maps are laid on their grid), "
        "timm:NAME (timm's architecture, e.g. timm:resnet50; the timm extra) or hf:PATH (a local "
        "save_pretrained folder of a Hugging Face image classifier; the huggingface extra)",
    )
    explain.add_argument(
        "--weights",
        help="a local state dict for a torchvision or timm --model: a torch.save file (or timm "
        "checkpoint; loaded with torch.load(weights_only=True)) or a .safetensors file",
    )
    explain.add_argument(
        "--num-classes",
        type=positive_int,
        help="outputs of a torchvision or timm --model (default: 1000; an hf: model's config says)",
    )
    explain.add_argument(
        "--image-size",
        type=positive_int,
        help="side of the centre crop the model sees (default: the size a timm or hf: model is "
        "configured for, else 224); the shorter side is first resized to it over the model's crop "
        "fraction (timm's crop_pct, a Hugging Face processor's crop_size / size, else 0.875). A "
        "timm or hf: model is normalised with its own mean and std (timm's pretrained_cfg, the "
        "folder's preprocessor_config.json), else ImageNet's",
    )
    add_common_options(
        explain,
        EXPLAIN_METHODS,
        f"{' '.join(EFFICIENTNET_LITE0_LAYERS)} for {BUNDLED_MODEL}; four blocks' ln_1 for a "
        "ViT, the stages of a Swin or ConvNeXt; four evenly spaced convolutions otherwise",
    )
    add_repeats_option(explain)
    explain.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Maps of the chosen methods at the chosen layers for the user's own image."""
    from pathlib import Path

    from captum_normgrad.cli._external_models import HF_PREFIX, check_huggingface_folder
    from captum_normgrad.cli._inputs import read_image
    from captum_normgrad.cli._outputs import check_output_folder, writing

    out = check_output_folder(args.out)  # the paths first: before any computation
    photo = read_image(args.image)
    if args.model.startswith(HF_PREFIX):
        check_huggingface_folder(args.model)

    import torch

    from captum_normgrad import data
    from captum_normgrad.cli._inputs import (
        default_layer_names,
        probe_layers,
        resolve_layers,
        resolve_target,
    )
    from captum_normgrad.cli._methods import METHODS, attribute_or_fail, median_seconds
    from captum_normgrad.cli._models import load_model
    from captum_normgrad.cli._table import format_table
    from captum_normgrad.figures import attribution_grid, save_figure

    model = load_model(args.model, args.weights, args.num_classes)
    target = resolve_target(model, args.target)
    image = data.center_crop(photo, args.image_size or model.image_size or 224, model.crop_fraction)
    inputs = model.prepare(image)
    logits, runs = probe_layers(model, inputs)
    layer_names = args.layers or default_layer_names(model)
    layers = resolve_layers(model, layer_names, runs)
    probabilities = logits.softmax(dim=1)[0]
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
        maps = attribute_or_fail(method, model.module, layers, inputs, targets)
        figure_maps[METHODS[method].label] = [layer_map[0] for layer_map in maps]
        if args.repeats:
            seconds = median_seconds(method, model.module, layers, inputs, targets, args.repeats)
            rows.append({"method": METHODS[method].label, "median_s": seconds})
    if rows:
        print(format_table(rows))
        print(f"median_s: median seconds of {args.repeats} warm call(s), after a warm-up call")
    title = f"{Path(args.image).name}: maps for '{model.class_names[target]}' ({model.name})"
    figure = attribution_grid(image, figure_maps, layer_names, title=title)
    figure_path = out / f"explain_{Path(args.image).stem}.png"
    with writing(figure_path):
        path = save_figure(figure, figure_path, dpi=args.dpi)
    print(f"figure: {path}")
    return 0
