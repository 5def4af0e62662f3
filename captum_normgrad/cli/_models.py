"""The model the command line explains: the bundled EfficientNet-Lite0 or a torchvision architecture.

A model that cannot be built or a weights file that does not fit raises :class:`CliError` with one
line meant to be printed as is (the valid names, the first mismatching key). Nothing is downloaded:
a torchvision architecture gets its random initial weights or the user's local state dict.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from captum_normgrad import data
from captum_normgrad.cli._errors import CliError

__all__ = ["BUNDLED_MODEL", "LoadedModel", "load_model"]

BUNDLED_MODEL = "efficientnet_lite0"


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
