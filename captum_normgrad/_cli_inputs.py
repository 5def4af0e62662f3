"""What the command line reads from the user, checked up front so a mistake is one clear line.

Every function here raises :class:`CliError` with a message meant to be printed as is: a missing or
unreadable image, an unknown model or layer (with the valid names), a class out of range, a weights
file that does not fit the architecture.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from captum_normgrad import data

__all__ = [
    "BUNDLED_MODEL",
    "CliError",
    "LoadedModel",
    "default_layer_names",
    "load_model",
    "read_image",
    "resolve_layers",
    "resolve_target",
]

BUNDLED_MODEL = "efficientnet_lite0"


class CliError(Exception):
    """A user mistake: printed as one line on stderr, with a non-zero exit status."""


@dataclass
class LoadedModel:
    """A model ready to explain, with what the command line needs around it.

    Attributes:
        name: ``efficientnet_lite0`` or a torchvision architecture name.
        module: the model, in eval mode.
        class_names: one name per output class.
        mean: the normalisation mean the model was trained with.
        std: the normalisation std.
    """

    name: str
    module: nn.Module
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def prepare(self, image: Tensor) -> Tensor:
        """A ``(3, H, W)`` image in [0, 1] -> a normalised batch of one for this model."""
        return data.normalize(image, self.mean, self.std).unsqueeze(0)


def _torchvision_architectures() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CliError(f"weights file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CliError(f"cannot read weights file {path}: {reason}") from error
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):  # common checkpoint wrappers
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CliError(f"weights file {path} does not hold a state dict (name -> tensor)")
    return loaded


def _load_weights(model: nn.Module, name: str, path: Path) -> None:
    """Load a state dict strictly, explaining a mismatch in one line instead of torch's essay."""
    state = _read_state_dict(path)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshapen = [
        f"{key} {tuple(state[key].shape)} vs {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if misshapen:
        problems.append(f"{len(misshapen)} of another shape (e.g. {misshapen[0]}; file vs model)")
    if problems:
        raise CliError(
            f"weights in {path} do not fit the architecture {name}: "
            + ", ".join(problems)
            + " (for another number of classes, pass --num-classes)"
        )
    model.load_state_dict(state, strict=True)


def load_model(name: str, weights: str | None = None, num_classes: int = 1000) -> LoadedModel:
    """The bundled EfficientNet-Lite0, or a torchvision architecture with a local state dict.

    Without ``weights`` a torchvision architecture keeps its random initial weights (useful only
    to try the command); nothing is ever downloaded.
    """
    if name == BUNDLED_MODEL:
        if num_classes != 1000:
            raise CliError(f"{BUNDLED_MODEL} has 1000 classes; drop --num-classes")
        try:
            module = data.load_efficientnet_lite0()
        except ImportError as error:
            raise CliError(str(error)) from error
        mean, std = data.EFFICIENTNET_LITE_MEAN, data.EFFICIENTNET_LITE_STD
    else:
        import torchvision

        architectures = _torchvision_architectures()
        if name not in architectures:
            close = difflib.get_close_matches(name, [BUNDLED_MODEL, *architectures], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CliError(
                f"unknown model {name!r}: use {BUNDLED_MODEL} or a torchvision classification "
                f"architecture (e.g. resnet18, vgg16){hint}"
            )
        module = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
    if weights is not None:
        _load_weights(module, name, Path(weights))
    module.eval()
    if num_classes == 1000:
        try:
            class_names = data.imagenet_class_names()
        except ImportError:
            class_names = [f"class {index}" for index in range(num_classes)]
    else:
        class_names = [f"class {index}" for index in range(num_classes)]
    return LoadedModel(name, module, class_names, tuple(mean), tuple(std))


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


def default_layer_names(model: LoadedModel, count: int = 4) -> list[str]:
    """The bundled model's four depths, or ``count`` convolutions evenly spaced through the model."""
    if model.name == BUNDLED_MODEL:
        return list(data.EFFICIENTNET_LITE0_LAYERS)
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
