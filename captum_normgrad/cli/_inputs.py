"""What the command line reads from the user, checked up front so a mistake is one clear line.

Every function here raises :class:`CliError` with a message meant to be printed as is: a missing or
unreadable image, an unknown layer or one without locations to map (listing the layers that have a
map, found by one forward pass), a class out of range or named without the names installed. The
model itself is loaded by :mod:`captum_normgrad.cli._models`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from captum_normgrad import data
from captum_normgrad._core.front_door import explained_output
from captum_normgrad._core.layouts import is_torchvision as _is_torchvision
from captum_normgrad.cli._errors import CliError
from captum_normgrad.cli._models import BUNDLED_MODEL, LoadedModel

__all__ = [
    "LayerRun",
    "default_layer_names",
    "probe_layers",
    "read_image",
    "resolve_layers",
    "resolve_target",
]


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


@dataclass(frozen=True)
class LayerRun:
    """What one forward pass showed of a module: how often it ran and the shape it returned."""

    calls: int
    shape: tuple[int, ...] | None  # None: the output is not a tensor (a tuple, say)

    def problem(self) -> str | None:
        """Why no map can be drawn at this module, or ``None`` when one can.

        A map needs a tensor output with locations: ``(N, C, H, W)`` or tokens ``(N, T, C)`` (which
        the library lays out or refuses by name). ``(N, C)`` (a classifier, a pooled vector) has
        none, and a module that runs several times per pass (EfficientNet's shared ``_swish``)
        has no single activation to explain.
        """
        if self.calls == 0:
            return "does not run in the forward pass (a container?)"
        if self.calls > 1:
            return f"runs {self.calls} times per forward pass (a shared module)"
        if self.shape is None:
            return "does not return a tensor"
        if len(self.shape) < 3:
            return f"returns shape {self.shape}: no locations to map"
        return None


def probe_layers(model: LoadedModel, inputs: Tensor) -> tuple[Tensor, dict[str, LayerRun]]:
    """One forward pass without gradients: the logits and, per named module, what it did."""
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}

    def recorder(name: str):
        def record(module: nn.Module, args: object, output: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            shapes[name] = tuple(output.shape) if isinstance(output, Tensor) else None

        return record

    modules = [(name, module) for name, module in model.module.named_modules() if name]
    handles = [module.register_forward_hook(recorder(name)) for name, module in modules]
    try:
        with torch.no_grad():
            output = explained_output(model.module(inputs))  # a ModelOutput's .logits
    except (RuntimeError, ValueError, AssertionError) as error:  # timm asserts its input size
        raise CliError(f"{model.name} cannot run on this input: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    runs = {name: LayerRun(calls.get(name, 0), shapes.get(name)) for name, _ in modules}
    return output, runs


def resolve_layers(
    model: LoadedModel, names: list[str], runs: dict[str, LayerRun]
) -> list[nn.Module]:
    """The modules named ``names``; an unknown name or one without a map lists the valid ones.

    Args:
        model: the loaded model.
        names: module names from ``--layers`` (or the defaults).
        runs: :func:`probe_layers`'s record of a forward pass on the input to explain.
    """
    if len(set(names)) != len(names):
        raise CliError(f"a layer is named twice in --layers: {' '.join(names)}")
    valid = [name for name, run in runs.items() if run.problem() is None]
    listed = [name for name in valid if name.count(".") <= 1]
    valid_list = ", ".join(listed) + (
        f" (and {len(valid) - len(listed)} deeper ones)" if len(valid) > len(listed) else ""
    )
    modules = dict(model.module.named_modules())
    for name in names:
        if name not in runs:
            close = difflib.get_close_matches(name, list(runs), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise CliError(
                f"unknown layer {name!r} in {model.name}; {hint}layers with a map: {valid_list}"
            )
        problem = runs[name].problem()
        if problem is not None:
            raise CliError(
                f"layer {name!r} of {model.name} {problem}; layers with a map: {valid_list}"
            )
    return [modules[name] for name in names]


def _evenly_spaced(names: list[str], count: int) -> list[str]:
    """``count`` of ``names`` evenly spaced, the first and the last among them."""
    count = min(count, len(names))
    step = (len(names) - 1) / max(count - 1, 1)
    return list(dict.fromkeys(names[round(index * step)] for index in range(count)))


def _token_blocks(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The blocks of a timm or Hugging Face ViT-like model, by name: timm's ``blocks`` (ViT, DeiT,
    EVA: the models with ``num_prefix_tokens``), Hugging Face's ``<base>.layers`` or
    ``<base>.encoder.layer`` (ViT, DeiT, DINOv2; the name depends on the transformers version)."""
    origin = type(module).__module__
    if origin.startswith("timm.") and hasattr(module, "num_prefix_tokens"):
        blocks = getattr(module, "blocks", None)
        return ("blocks", blocks) if isinstance(blocks, nn.Module) else None
    if origin.startswith("transformers."):
        base = getattr(module, "base_model_prefix", "")
        modules = dict(module.named_modules())
        for name in (f"{base}.layers", f"{base}.encoder.layer", f"{base}.encoder.layers"):
            if isinstance(modules.get(name), nn.ModuleList):
                return name, modules[name]
    return None


def _block_norm_names(module: nn.Module, count: int) -> list[str] | None:
    """A timm or Hugging Face ViT's depths: its blocks' first LayerNorm (timm's ``norm1``, Hugging
    Face's ``layernorm_before`` or ``norm1``), evenly spaced and ending with the last block's."""
    found = _token_blocks(module)
    if found is None:
        return None
    prefix, blocks = found
    names = []
    for block_name, block in blocks.named_children():
        norm = next((n for n, m in block.named_children() if isinstance(m, nn.LayerNorm)), None)
        if norm is not None:
            names.append(f"{prefix}.{block_name}.{norm}")
    return _evenly_spaced(names, count) if names else None


def _transformer_layer_names(module: nn.Module, count: int) -> list[str] | None:
    """Depths for torchvision's transformers, else ``None``: a ViT's blocks' first LayerNorm, evenly
    spaced and ending with the last block's (its output's patch tokens never reach a class-token
    head); the stages of a Swin (channels last) or a ConvNeXt."""
    if _is_torchvision(module, "VisionTransformer"):
        blocks = [
            f"encoder.layers.{name}.ln_1" for name, _ in module.encoder.layers.named_children()
        ]
        return _evenly_spaced(blocks, count)
    if _is_torchvision(module, "SwinTransformer") or _is_torchvision(module, "ConvNeXt"):
        # features: stem, then stages alternating with downsampling (PatchMerging, LayerNorm2d+conv).
        return [f"features.{index}" for index in range(1, len(module.features), 2)][-count:]
    return None


def default_layer_names(model: LoadedModel, count: int = 4) -> list[str]:
    """The bundled model's four depths, the depths of torchvision's ViT, Swin and ConvNeXt, the
    blocks' first LayerNorm of a timm or Hugging Face ViT, or ``count`` convolutions evenly spaced
    through the model (timm's and Hugging Face's CNNs, ConvNeXts and Swins among them)."""
    if model.name == BUNDLED_MODEL:
        return list(data.EFFICIENTNET_LITE0_LAYERS)
    transformer = _transformer_layer_names(model.module, count) or _block_norm_names(
        model.module, count
    )
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
        if model.names_missing is not None:
            raise CliError(
                f"--target {target!r} is a class name, but {model.names_missing}; give the class "
                "index instead"
            ) from None
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
