"""The model the command line explains: the bundled EfficientNet-Lite0, a torchvision or timm
architecture (``timm:NAME``), or a local Hugging Face folder (``hf:PATH``).

A model that cannot be built or a weights file that does not fit raises :class:`CliError` with one
line meant to be printed as is (the valid names, the first mismatching key). Nothing is downloaded:
a torchvision or timm architecture gets its random initial weights or the user's local state dict
(:mod:`captum_normgrad.cli._external_models` builds the timm and Hugging Face ones).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from captum_normgrad import data
from captum_normgrad._core.asset_names import BUNDLED_MODEL
from captum_normgrad.cli._errors import CliError, first_line
from captum_normgrad.cli._external_models import (
    HF_PREFIX,
    TIMM_PREFIX,
    InputView,
    load_huggingface,
    load_timm,
)

__all__ = ["BUNDLED_MODEL", "LoadedModel", "load_model"]


@dataclass
class LoadedModel:
    """A model ready to explain, with what the command line needs around it.

    Attributes:
        name: ``efficientnet_lite0``, a torchvision architecture name, ``timm:NAME`` or ``hf:PATH``.
        module: the model, in eval mode.
        class_names: one name per output class (``class 0``, ... when the names are unknown).
        mean: the normalisation mean the model was trained with.
        std: the normalisation std.
        names_missing: why ``class_names`` are placeholders (e.g. the extra that provides the
            ImageNet names is not installed), or ``None`` when they are real.
        image_size: the side of the square the model was configured to see (timm's
            ``pretrained_cfg``, a Hugging Face processor or config), or ``None`` when it does not
            say.
        crop_fraction: that square's side over the shorter side of the resized image (timm's
            ``crop_pct``; ImageNet's 0.875 when the model does not say).
    """

    name: str
    module: nn.Module
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    names_missing: str | None = None
    image_size: int | None = None
    crop_fraction: float = data.IMAGENET_CROP_FRACTION

    def prepare(self, image: Tensor) -> Tensor:
        """A ``(3, H, W)`` image in [0, 1] -> a normalised batch of one for this model."""
        return data.normalize(image, self.mean, self.std).unsqueeze(0)

    def configured_view(self) -> tuple[int, int] | None:
        """``(shorter side after resizing, centre crop)`` as the model's configuration gives them
        (as :func:`captum_normgrad.data.center_crop` computes them), or ``None`` when it does not."""
        if self.image_size is None:
            return None
        return round(self.image_size / self.crop_fraction), self.image_size


def _torchvision_architectures() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _is_torch_file(path: Path) -> bool:
    """``torch.save`` writes a zip archive (or, before torch 1.6, a pickle: first byte 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with path.open("rb") as handle:
        return handle.read(1) == b"\x80"


def _is_safetensors_file(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then its JSON header."""
    with path.open("rb") as handle:
        start = handle.read(9)
    return len(start) == 9 and start[8:] == b"{" and int.from_bytes(start[:8], "little") > 1


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as error:
        raise CliError(
            f"weights file {path} is a safetensors file, which needs the package 'safetensors', "
            'not installed; pip install "captum-normgrad[timm]"'
        ) from error
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CliError(
            f"cannot read weights file {path} as safetensors ({first_line(error)}); is it complete?"
        ) from error


def _checkpoint_globals() -> contextlib.AbstractContextManager:
    """timm's training checkpoints also hold their ``argparse.Namespace`` of arguments, plain data
    that ``weights_only`` may accept (torch >= 2.5 can be told so)."""
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext()


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CliError(f"weights file not found: {path}")
    if not _is_torch_file(path):
        if _is_safetensors_file(path) or path.suffix == ".safetensors":
            return _read_safetensors(path)
        raise CliError(
            f"weights file {path} was not written by torch.save or safetensors; pass a state "
            "dict saved with torch.save(model.state_dict(), PATH) or safetensors.torch.save_file"
        )
    try:
        with _checkpoint_globals():
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused an object
        raise CliError(
            f"weights file {path} holds Python objects besides tensors, which are never loaded "
            "(torch.load(weights_only=True)); save model.state_dict() instead of the model"
        ) from error
    except Exception as error:  # a truncated or corrupt archive: torch raises several types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CliError(
            f"cannot read weights file {path} ({type(error).__name__}: {reason}); is it complete?"
        ) from error
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):  # common checkpoint wrappers (timm's, for one)
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CliError(
            f"weights file {path} holds a {type(loaded).__name__}, not a state dict (parameter "
            "name -> tensor); save it with torch.save(model.state_dict(), PATH)"
        )
    return loaded


def _only_classes_differ(misshapen: list[tuple[torch.Size, torch.Size]]) -> bool:
    """Every mismatch is the first dimension (outputs) of the final layer's weight and bias."""
    return 0 < len(misshapen) <= 2 and all(
        file[1:] == model[1:] and file[0] == misshapen[0][0][0] for file, model in misshapen
    )


def _load_weights(model: nn.Module, name: str, path: Path) -> None:
    """Load a state dict strictly, explaining a mismatch in one line instead of torch's essay.

    ``--num-classes`` is suggested only when the file fits but for the classifier's output count;
    a file from another architecture (VGG weights for a ResNet) is said to be one.
    """
    state = _read_state_dict(path)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshapen = [
        key for key, tensor in expected.items() if key in state and state[key].shape != tensor.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if misshapen:
        key = misshapen[0]
        example = f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        problems.append(f"{len(misshapen)} of another shape (e.g. {example}; file vs model)")
    if not problems:
        model.load_state_dict(state, strict=True)
        return
    shapes = [(state[key].shape, expected[key].shape) for key in misshapen]
    if not missing and not unexpected and _only_classes_differ(shapes):
        classes = shapes[0][0][0]
        raise CliError(
            f"weights in {path} are for {name} with {classes} classes: pass --num-classes {classes}"
        )
    raise CliError(f"weights in {path} are not for the architecture {name}: " + ", ".join(problems))


_IMAGENET = (tuple(data.IMAGENET_MEAN), tuple(data.IMAGENET_STD))


def _with_view(model: LoadedModel, view: InputView) -> LoadedModel:
    """``model`` with what its configuration says of its images (ImageNet's where it is silent)."""
    return dataclasses.replace(
        model,
        mean=view.mean or model.mean,
        std=view.std or model.std,
        image_size=view.side,
        crop_fraction=view.crop_fraction or model.crop_fraction,
    )


def load_model(
    name: str, weights: str | None = None, num_classes: int | None = None
) -> LoadedModel:
    """The bundled EfficientNet-Lite0, a torchvision or timm architecture with a local state dict,
    or the Hugging Face image classifier saved in a local folder.

    Without ``weights`` a torchvision or timm architecture keeps its random initial weights (useful
    only to try the command); nothing is ever downloaded. ``num_classes`` defaults to 1000; a
    Hugging Face model takes its classes (and their names) from its config.
    """
    if name.startswith(HF_PREFIX):
        if weights is not None:
            raise CliError(f"--model {name} holds its own weights; drop --weights")
        module, view, labels = load_huggingface(name)
        if num_classes is not None and num_classes != len(labels):
            raise CliError(f"{name} has {len(labels)} classes (its config's); drop --num-classes")
        return _with_view(LoadedModel(name, module.eval(), labels, *_IMAGENET), view)
    num_classes = num_classes or 1000
    view = None
    if name == BUNDLED_MODEL:
        if num_classes != 1000:
            raise CliError(f"{BUNDLED_MODEL} has 1000 classes; drop --num-classes")
        try:
            module = data.load_efficientnet_lite0()
        except ImportError as error:
            raise CliError(str(error)) from error
        mean, std = data.EFFICIENTNET_LITE_MEAN, data.EFFICIENTNET_LITE_STD
    elif name.startswith(TIMM_PREFIX):
        module, view = load_timm(name, num_classes)
        mean, std = _IMAGENET
    else:
        import torchvision

        architectures = _torchvision_architectures()
        if name not in architectures:
            close = difflib.get_close_matches(name, [BUNDLED_MODEL, *architectures], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CliError(
                f"unknown model {name!r}: use {BUNDLED_MODEL}, a torchvision classification "
                f"architecture (e.g. resnet18, vgg16), timm:NAME or hf:PATH{hint}"
            )
        module = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        mean, std = _IMAGENET
    if weights is not None:
        _load_weights(module, name, Path(weights))
    module.eval()
    class_names = [f"class {index}" for index in range(num_classes)]
    names_missing = f"{name} has {num_classes} classes, without names"
    if num_classes == 1000:
        try:
            class_names, names_missing = data.imagenet_class_names(), None
        except ImportError as error:  # says which extra to install
            names_missing = str(error)
    loaded = LoadedModel(name, module, class_names, tuple(mean), tuple(std), names_missing)
    return loaded if view is None else _with_view(loaded, view)
