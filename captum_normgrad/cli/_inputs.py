"""What the command line reads from the user, checked up front so a mistake is one clear line.

Every function here raises :class:`CliError` with a message meant to be printed as is: a missing or
unreadable image, an unknown layer (with the valid names), a class out of range. The model itself is
loaded by :mod:`captum_normgrad.cli._models`.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import Tensor, nn

from captum_normgrad import data
from captum_normgrad._layouts import is_torchvision as _is_torchvision
from captum_normgrad.cli._errors import CliError
from captum_normgrad.cli._models import BUNDLED_MODEL, LoadedModel

__all__ = ["default_layer_names", "read_image", "resolve_layers", "resolve_target"]


def read_image(path: str | Path) -> Tensor:
    """Read an image file as ``(3, H, W)`` in [0, 1] (grey and RGBA images become RGB)."""
    import matplotlib.image
    from PIL import UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise CliError(f"image not found: {path}")
    if not path.is_file():
        raise CliError(f"not a file: {path}")
    try:
        array = matplotlib.image.imread(path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise CliError(f"cannot read {path} as an image: {error}") from error
    try:
        return data.image_to_tensor(array)
    except ValueError as error:
        raise CliError(f"cannot use {path}: {error}") from error


def resolve_layers(model: LoadedModel, names: list[str]) -> list[nn.Module]:
    """The modules named ``names`` in the model; an unknown name lists the valid ones."""
    modules = dict(model.module.named_modules())
    modules.pop("", None)
    layers = []
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            shallow = [key for key in modules if key.count(".") <= 1]
            raise CliError(
                f"unknown layer {name!r} in {model.name}; {hint}valid names include: "
                + ", ".join(shallow)
            )
        layers.append(modules[name])
    if len(set(names)) != len(names):
        raise CliError(f"a layer is named twice in --layers: {' '.join(names)}")
    return layers


def _transformer_layer_names(module: nn.Module, count: int) -> list[str] | None:
    """Depths for torchvision's transformers, else ``None``: a ViT's blocks' first LayerNorm, evenly
    spaced and ending with the last block's (its output's patch tokens never reach a class-token
    head); the stages of a Swin (channels last) or a ConvNeXt."""
    if _is_torchvision(module, "VisionTransformer"):
        blocks = [
            f"encoder.layers.{name}.ln_1" for name, _ in module.encoder.layers.named_children()
        ]
        step = (len(blocks) - 1) / max(count - 1, 1)
        picked = [blocks[round(index * step)] for index in range(min(count, len(blocks)))]
        return list(dict.fromkeys(picked))
    if _is_torchvision(module, "SwinTransformer") or _is_torchvision(module, "ConvNeXt"):
        # features: stem, then stages alternating with downsampling (PatchMerging, LayerNorm2d+conv).
        return [f"features.{index}" for index in range(1, len(module.features), 2)][-count:]
    return None


def default_layer_names(model: LoadedModel, count: int = 4) -> list[str]:
    """The bundled model's four depths, the depths of torchvision's ViT, Swin and ConvNeXt, or
    ``count`` convolutions evenly spaced through the model."""
    if model.name == BUNDLED_MODEL:
        return list(data.EFFICIENTNET_LITE0_LAYERS)
    transformer = _transformer_layer_names(model.module, count)
    if transformer is not None:
        return transformer
    convs = [name for name, m in model.module.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise CliError(f"{model.name} has no Conv2d layer; choose layers with --layers")
    if len(convs) <= count:
        return convs
    step = (len(convs) - 1) / (count - 1)
    return [convs[round(index * step)] for index in range(count)]


def resolve_target(model: LoadedModel, target: str | None) -> int | None:
    """A class index or an exact class name -> the index (``None`` keeps the top-1 prediction)."""
    if target is None:
        return None
    num_classes = len(model.class_names)
    try:
        index = int(target)
    except ValueError:
        lowered = [name.lower() for name in model.class_names]
        if target.lower() in lowered:
            return lowered.index(target.lower())
        close = difflib.get_close_matches(target.lower(), lowered, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise CliError(f"unknown class name {target!r} for {model.name}{hint}") from None
    if not 0 <= index < num_classes:
        raise CliError(
            f"class index {index} is out of range: {model.name} has {num_classes} classes "
            f"(0..{num_classes - 1})"
        )
    return index
