"""``--model timm:NAME`` and ``--model hf:PATH``: models of the optional extras, built offline.

A timm architecture is built by name with ``pretrained=False`` (its random initial weights, or the
user's ``--weights``, loaded by :mod:`captum_normgrad.cli._models`); a Hugging Face model is read
from a local ``save_pretrained`` folder with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``.
Nothing is ever downloaded. A missing extra, an unknown name or a folder that holds no model is a
:class:`CliError` of one line. Each loader also reads how the model wants its images
(:class:`InputView`): timm's ``resolve_data_config`` (``input_size``, ``crop_pct``, ``mean``,
``std``), a Hugging Face folder's ``preprocessor_config.json`` (``size``, ``crop_size``,
``image_mean``, ``image_std``) or, without one, its config's ``image_size`` with ImageNet's
statistics. ``explain`` checks an ``hf:`` folder with the other paths, before loading anything.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from captum_normgrad.cli._errors import CliError, first_line

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "HF_PREFIX",
    "TIMM_PREFIX",
    "InputView",
    "check_huggingface_folder",
    "load_huggingface",
    "load_timm",
]

TIMM_PREFIX, HF_PREFIX = "timm:", "hf:"


@dataclass(frozen=True)
class InputView:
    """How a model wants its images, as its own configuration says; ``None``: it does not say
    (the command line then uses ImageNet's view and statistics, :mod:`captum_normgrad.data`'s).

    Attributes:
        side: the side of the square the model sees (a centre crop).
        crop_fraction: the crop's side over the shorter side of the resized image (timm's
            ``crop_pct``): images are resized to ``side / crop_fraction``, then centre-cropped.
        mean: the per-channel normalisation mean, for images in [0, 1].
        std: the per-channel normalisation std.
    """

    side: int | None
    crop_fraction: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def _extra(module: str, extra: str, model: str) -> ModuleType:
    """Import the package of an optional extra, or name the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise CliError(
            f"--model {model} needs the package '{module}', which is not installed; "
            f'pip install "captum-normgrad[{extra}]"'
        ) from error


def _square_side(size: object) -> int | None:
    """A configured image size (an int, or ``(H, W)`` / ``(C, H, W)``) -> its side if square."""
    if isinstance(size, Sequence) and len(size) >= 2 and size[-1] == size[-2]:
        size = size[-1]
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _statistics(values: object, name: str, where: object) -> tuple[float, ...]:
    """Three per-channel values (one is broadcast), or a refusal naming the file."""
    if isinstance(values, (int, float)):
        values = [values]
    if (
        not isinstance(values, Sequence)
        or len(values) not in (1, 3)
        or not all(isinstance(value, (int, float)) for value in values)
    ):
        raise CliError(f"{where}: {name} must be 1 or 3 numbers, got {values!r}")
    return tuple(float(value) for value in values) * (3 // len(values))


def _timm_view(timm: ModuleType, module: nn.Module, model: str) -> InputView:
    """timm's own reading of the model's ``pretrained_cfg`` (its evaluation transform's values)."""
    config = timm.data.resolve_data_config({}, model=module)
    return InputView(
        _square_side(config.get("input_size")),
        float(config["crop_pct"]) if config.get("crop_pct") else None,
        _statistics(config["mean"], "mean", model) if "mean" in config else None,
        _statistics(config["std"], "std", model) if "std" in config else None,
    )


def load_timm(model: str, num_classes: int) -> tuple[nn.Module, InputView]:
    """timm's architecture ``timm:NAME`` with random weights, and how it wants its images."""
    name = model[len(TIMM_PREFIX) :]
    timm = _extra("timm", "timm", model)
    if not name or not timm.is_model(name):
        known = timm.list_models()
        close = difflib.get_close_matches(name, known, n=5)
        stem = name.split("_")[0]
        if not close and stem:
            close = timm.list_models(f"*{stem}*")[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CliError(f"unknown timm model {name!r} (timm.list_models() names them){hint}")
    try:
        module = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except (RuntimeError, ValueError, TypeError) as error:
        raise CliError(f"cannot build {model}: {first_line(error)}") from error
    return module, _timm_view(timm, module, model)


def check_huggingface_folder(model: str) -> Path:
    """The folder of ``hf:PATH``, refused unless it exists and holds a ``config.json``."""
    folder = Path(model[len(HF_PREFIX) :])
    if not folder.is_dir():
        raise CliError(f"--model {model}: no such folder (a local save_pretrained folder)")
    if not (folder / "config.json").is_file():
        raise CliError(
            f"--model {model}: {folder} holds no config.json; pass a folder written by "
            "model.save_pretrained(PATH)"
        )
    return folder


def _processor_side(size: object) -> int | None:
    """A processor's ``size`` / ``crop_size``: an int, ``{"height": S, "width": S}`` or
    ``{"shortest_edge": S}`` -> ``S`` (a non-square size says no side)."""
    if isinstance(size, dict):
        if "shortest_edge" in size:
            return _square_side(size["shortest_edge"])
        return _square_side((size.get("height"), size.get("width")))
    return _square_side(size)


def _huggingface_view(folder: Path, image_size: object) -> InputView:
    """The folder's ``preprocessor_config.json`` when there is one, else the config's image size.

    The processor's resize to ``size`` then, with ``do_center_crop``, its ``crop_size`` crop (or
    ConvNeXt's ``crop_pct``) give the view; its ``image_mean`` / ``image_std`` the statistics
    (none with ``do_normalize`` false).
    """
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return InputView(_square_side(image_size))
    try:
        processor = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CliError(f"cannot read {path}: {first_line(error)}") from error
    if not isinstance(processor, dict):
        raise CliError(f"{path} holds no preprocessor configuration (a JSON object)")
    mean = std = None
    if not processor.get("do_normalize", True):
        mean, std = (0.0,) * 3, (1.0,) * 3
    if mean is None and "image_mean" in processor:
        mean = _statistics(processor["image_mean"], "image_mean", path)
    if std is None and "image_std" in processor:
        std = _statistics(processor["image_std"], "image_std", path)
    resized = _processor_side(processor.get("size")) if processor.get("do_resize", True) else None
    cropped = (
        _processor_side(processor.get("crop_size")) if processor.get("do_center_crop") else None
    )
    if resized is None:
        return InputView(cropped or _square_side(image_size), 1.0, mean, std)
    if cropped is not None:
        return InputView(cropped, cropped / resized, mean, std)
    fraction = processor.get("crop_pct")
    return InputView(resized, float(fraction) if fraction else 1.0, mean, std)


def load_huggingface(model: str) -> tuple[nn.Module, InputView, list[str]]:
    """The image classifier saved in ``hf:PATH``, how it wants its images and its labels."""
    folder = check_huggingface_folder(model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read before transformers is imported
    transformers = _extra("transformers", "huggingface", model)
    logging = transformers.utils.logging
    bar_was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # stderr keeps to the result, or to the one line of an error
    try:
        module = transformers.AutoModelForImageClassification.from_pretrained(
            folder, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CliError(
            f"cannot load an image classifier from {folder}: {first_line(error)}"
        ) from error
    finally:
        if bar_was_enabled:
            logging.enable_progress_bar()
    config = module.config
    labels = [
        str(config.id2label.get(index, f"class {index}")).split(",")[0].strip()
        for index in range(config.num_labels)
    ]
    return module, _huggingface_view(folder, getattr(config, "image_size", None)), labels
