"""``--model timm:NAME`` and ``--model hf:PATH``: models of the optional extras, built offline.

A timm architecture is built by name with ``pretrained=False`` (its random initial weights, or the
user's ``--weights``, loaded by :mod:`captum_normgrad.cli._models`); a Hugging Face model is read
from a local ``save_pretrained`` folder with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``.
Nothing is ever downloaded. A missing extra, an unknown name or a folder that holds no model is a
:class:`CliError` of one line. Each loader also reads the image side the model was configured for
(timm's ``pretrained_cfg['input_size']``, the Hugging Face config's ``image_size``). ``explain``
checks an ``hf:`` folder with the other paths, before loading anything.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from captum_normgrad.cli._errors import CliError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["HF_PREFIX", "TIMM_PREFIX", "check_huggingface_folder", "load_huggingface", "load_timm"]

TIMM_PREFIX, HF_PREFIX = "timm:", "hf:"


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
    if isinstance(size, int):
        return size
    if isinstance(size, Sequence) and len(size) >= 2 and size[-1] == size[-2]:
        return int(size[-1])
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_timm(model: str, num_classes: int) -> tuple[nn.Module, int | None]:
    """timm's architecture ``timm:NAME`` with random weights, and its configured image side."""
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
        raise CliError(f"cannot build {model}: {_first_line(error)}") from error
    config = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None) or {}
    return module, _square_side(config.get("input_size"))


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


def load_huggingface(model: str) -> tuple[nn.Module, int | None, list[str]]:
    """The image classifier saved in ``hf:PATH``, its configured image side and its labels."""
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
            f"cannot load an image classifier from {folder}: {_first_line(error)}"
        ) from error
    finally:
        if bar_was_enabled:
            logging.enable_progress_bar()
    config = module.config
    labels = [
        str(config.id2label.get(index, f"class {index}")).split(",")[0].strip()
        for index in range(config.num_labels)
    ]
    return module, _square_side(getattr(config, "image_size", None)), labels
