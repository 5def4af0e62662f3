"""The one module that touches Captum's private helpers.

Captum's private API can change between releases; keeping every such import here means a Captum
upgrade is checked in one place. The supported range is pinned in ``pyproject.toml``.
"""

from captum._utils.common import (
    _format_additional_forward_args,
    _format_tensor_into_tuples,
    _run_forward,
    _select_targets,
)
from captum._utils.typing import TargetType

__all__ = [
    "TargetType",
    "format_additional_forward_args",
    "format_inputs",
    "run_forward",
    "select_targets",
]

format_inputs = _format_tensor_into_tuples
format_additional_forward_args = _format_additional_forward_args
run_forward = _run_forward
select_targets = _select_targets
