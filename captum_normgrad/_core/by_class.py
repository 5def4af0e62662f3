"""Registries keyed by a class's qualified name (``module.QualifiedName``), looked up along the
MRO, so that subclasses are recognised: the layout rules and the tuple outputs of
:mod:`captum_normgrad._core.layouts` and :mod:`captum_normgrad._core.hidden_states`. By name, not
by class object, so that a library that is not installed (timm, transformers) is never imported to
build them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from torch import nn

__all__ = ["qualified_name", "registered"]

T = TypeVar("T")


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered(registry: Mapping[str, T], module: nn.Module) -> T | None:
    """The entry of ``module``'s class, or of its nearest registered base class, else ``None``."""
    for cls in type(module).__mro__:
        entry = registry.get(qualified_name(cls))
        if entry is not None:
            return entry
    return None
