"""Which models ``batch_mode="factored"`` can run, decided from the model's traced graph.

The factored passes run a chunk of examples through the model as ONE batch and add each example's
parameter update with hooks on the layers that have parameters. That gives each example exactly
what the per-example loop gives only if:

- no operation mixes the examples of the batch (BatchNorm in training mode, a mean over dim 0);
- every trainable parameter is used by its own module's forward, once per pass, and that module is
  one the factored rules know (:data:`captum_normgrad._order1.factored.rules.RULES`);
- no hook the user registered changes what runs.

``torch.fx.symbolic_trace`` gives the model's operations; each must be on an allowlist of
operations that act on every example separately (deny by default). A model that cannot be traced,
or uses anything else, is refused with the reason, and ``batch_mode="auto"`` then takes the loop.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from captum_normgrad._core.model_state import preserved_buffers
from captum_normgrad._core.pause import is_ignored_while_paused
from captum_normgrad._order1.factored.rules import RULES

__all__ = ["factored_refusal"]

# Modules without trainable parameters that act on each example separately.
_PER_EXAMPLE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.ZeroPad2d,
    nn.Upsample,  # a segmenter's: interpolates each example's own locations
)

_ELEMENTWISE_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.clone,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.interpolate,
}
_ELEMENTWISE_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "add",
    "add_",
    "sub",
    "mul",
    "mul_",
    "contiguous",
    "clone",
    "size",
}


def _argument(node: fx.Node, position: int, keyword: str, default: object) -> object:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


def _keeps_batch_dim(node: fx.Node) -> str | None:
    """Why a flatten, concatenation, reduction, transposition or reshape node would mix the
    examples (it touches dimension 0, or its dimensions cannot be read), or None."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name == "flatten":
        start = _argument(node, 1, "start_dim", 0)
        return None if isinstance(start, int) and start >= 1 else f"flatten(start_dim={start})"
    if name == "cat":
        dim = _argument(node, 1, "dim", 0)
        return None if isinstance(dim, int) and dim >= 1 else f"cat(dim={dim})"
    if name in ("mean", "sum", "amax", "amin"):
        dims = _argument(node, 1, "dim", None)
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        kept = all(isinstance(d, int) and d >= 1 for d in dims)
        return None if kept else f"{name}(dim={_argument(node, 1, 'dim', None)})"
    if name == "transpose":
        dims = (_argument(node, 1, "dim0", None), _argument(node, 2, "dim1", None))
        kept = all(isinstance(d, int) and d >= 1 for d in dims)
        return None if kept else f"transpose{dims}"
    if name == "permute":
        order = node.args[1:] if len(node.args) > 2 else _argument(node, 1, "dims", ())
        return None if tuple(order)[:1] == (0,) else f"permute{tuple(order)}"
    if name in ("view", "reshape"):
        first = node.args[1] if len(node.args) > 1 else None
        if isinstance(first, (tuple, list)):
            first = first[0] if first else None
        batch = (
            isinstance(first, fx.Node)
            and first.op == "call_method"
            and first.target == "size"
            and first.args[0] is node.args[0]
            and _argument(first, 1, "dim", None) == 0
        )
        return None if batch else f"{name} whose first size is not x.size(0)"
    return f"{name}"


def _node_refusal(node: fx.Node, model: nn.Module, calls: dict[str, int]) -> str | None:
    if node.op in ("placeholder", "output"):
        return None
    if node.op == "get_attr":
        return f"its forward reads '{node.target}' directly, outside a module's forward"
    if node.op == "call_module":
        if node.kwargs:
            return f"module '{node.target}' is called with keyword arguments"
        module = model.get_submodule(node.target)
        if type(module) in RULES:
            calls[node.target] = calls.get(node.target, 0) + 1
            return None
        if isinstance(module, nn.Flatten):
            return None if module.start_dim >= 1 else f"module '{node.target}' flattens dim 0"
        if type(module) in _PER_EXAMPLE_MODULES:
            return None
        return f"module '{node.target}' ({type(module).__name__}) is not one it knows"
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return None
        if node.target in (torch.flatten, torch.cat, torch.mean, torch.sum, torch.transpose):
            reason = _keeps_batch_dim(node)
            return None if reason is None else f"its forward calls {reason}"
        return f"its forward calls {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        if node.target == "size" and any(
            user.target not in ("view", "reshape") for user in node.users
        ):
            return "its forward computes with a size of its input (it changes with the chunk)"
        if node.target in _ELEMENTWISE_METHODS:
            return None
        if node.target in (
            "flatten",
            "view",
            "reshape",
            "mean",
            "sum",
            "amax",
            "amin",
            "transpose",
            "permute",
        ):
            reason = _keeps_batch_dim(node)
            return None if reason is None else f"its forward calls {reason}"
        return f"its forward calls the method .{node.target}()"
    return f"its forward has a {node.op} node"


def _graph_refusal(model: nn.Module) -> str | None:
    try:
        # The trace runs the forward on proxies: one that assigns (``self.ema = ...``) would leave
        # a Proxy in the user's module, so every binding is restored after it, also on failure.
        with preserved_buffers([model]):
            graph = fx.symbolic_trace(model).graph
    except Exception as error:  # noqa: BLE001 - any tracing failure means "cannot tell"
        return f"torch.fx cannot trace its forward ({type(error).__name__}: {error})"
    calls: dict[str, int] = {}
    for node in graph.nodes:
        reason = _node_refusal(node, model, calls)
        if reason is not None:
            return reason
    reused = [name for name, count in calls.items() if count > 1]
    if reused:
        return f"module '{reused[0]}' runs {calls[reused[0]]} times in one forward"
    return None


_GRAPH_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_graph_refusal(model: nn.Module) -> str | None:
    """Traced once per model and module structure (tracing ResNet-50 takes tens of ms)."""
    structure = tuple((name, id(module)) for name, module in model.named_modules())
    cached = _GRAPH_CACHE.get(model)
    if cached is None or cached[0] != structure:
        cached = (structure, _graph_refusal(model))
        _GRAPH_CACHE[model] = cached
    return cached[1]


def _module_refusal(name: str, module: nn.Module) -> str | None:
    trainable = any(p.requires_grad for p in module.parameters(recurse=False))
    if trainable and type(module) not in RULES:
        return (
            f"module '{name}' ({type(module).__name__}) has trainable parameters it has no rule for"
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None:
            return (
                f"BatchNorm '{name}' normalises with the statistics of the batch (training mode or "
                "no running statistics), which would mix the examples"
            )
    if isinstance(module, nn.modules.conv._ConvNd) and type(module) in RULES:
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"convolution '{name}' pads with {module.padding!r} / {module.padding_mode!r}"
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    if module._backward_hooks or not all(map(is_ignored_while_paused, hooks)):
        return f"module '{name}' has hooks of its own"
    return None


def factored_refusal(model: nn.Module, forward_func: Callable) -> str | None:
    """Why ``batch_mode="factored"`` cannot run ``forward_func`` on ``model``, or None if it can.
    Any module the forward runs can be attributed (its taps are hooks added per call)."""
    if (
        forward_func is not model
        and getattr(forward_func, "__func__", None) is not type(model).forward
    ):
        return "forward_func is not the model itself (a bound method other than forward)"
    modules = nn.modules.module
    if (
        modules._global_forward_hooks
        or modules._global_forward_pre_hooks
        or modules._global_backward_hooks
    ):
        return "global module hooks are registered"
    owners: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            if parameter.requires_grad and owners.setdefault(id(parameter), name) != name:
                return (
                    f"modules '{owners[id(parameter)]}' and '{name}' share a trainable parameter "
                    "(tied weights), whose update is the sum of both uses"
                )
    for name, module in model.named_modules():
        reason = _module_refusal(name or type(module).__name__, module)
        if reason is not None:
            return reason
    return _cached_graph_refusal(model)
