"""Which batch mode runs a call of order 1, and how many examples go in a chunk: one :class:`Plan`.

Every example gets its own inner step, so a batch cannot share one set of stepped parameters. Three
ways to run it give the same maps (up to rounding):

- ``"loop"``: the passes on each example alone (batch dimension 1), plain autograd
  (:mod:`captum_normgrad._order1.loop`). Memory: two copies of the parameters at a time.
- ``"factored"``: each pass once for a chunk of examples at the shared parameters, each example's
  own update added layer by layer from its factors (:mod:`captum_normgrad._order1.factored`), for
  the models :mod:`captum_normgrad._order1.factored.tracing` accepts. Memory: each layer's input and
  output gradient per example, so a chunk holds about :data:`FACTORED_CHUNK_BYTES` of them.
- ``"vmap"``: ``torch.func.vmap`` over a chunk of examples; each convolution runs once per pass with
  per-example weights. Memory: about :data:`PARAMETER_COPIES_PER_EXAMPLE` copies of the trainable
  parameters per example in the chunk, so the chunk is sized to fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from captum_normgrad._order1.autograd import ForwardCaller
from captum_normgrad._order1.examples import is_per_example
from captum_normgrad._order1.factored.passes import trainable_modules
from captum_normgrad._order1.factored.tracing import factored_refusal
from captum_normgrad._order1.vmap import full_backward_hook_owner
from captum_normgrad.losses import LossSpec

__all__ = [
    "FACTORED_CHUNK",
    "FACTORED_CHUNK_BYTES",
    "FACTORED_EXAMPLE_BYTES",
    "PARAMETER_COPIES_PER_EXAMPLE",
    "BatchMode",
    "Plan",
    "balanced_chunks",
    "layer_bytes_per_example",
    "plan_call",
]

BatchMode = Literal["auto", "factored", "loop", "vmap"]
Mode = Literal["factored", "loop", "vmap"]


@dataclass(frozen=True)
class Plan:
    """How one call runs its passes.

    Attributes:
        mode: the passes that run.
        chunk_size: examples per chunk (1 for the loop).
        asked: the ``batch_mode`` the user gave; under ``"auto"`` the loop takes over where the
            factored or vmapped passes turn out not to run the model.
        factored_refusal: why the factored passes do not serve this call (None where they do).
        vmap_refusal: what torch.func cannot run in this model (None where it can).
    """

    mode: Mode
    chunk_size: int
    asked: BatchMode
    factored_refusal: str | None = None
    vmap_refusal: str | None = None


# The factored passes keep each layer's input and output gradient per example and run a chunk as
# one batch. "auto" takes them up to FACTORED_EXAMPLE_BYTES of layers per example (the largest
# model measured faster than the loop), and a chunk holds about FACTORED_CHUNK_BYTES of them: the
# budgets come from benchmarks/bench_order1.py, whose figures the README's measured cost quotes.
FACTORED_EXAMPLE_BYTES = 192 << 20
FACTORED_CHUNK_BYTES = 768 << 20
FACTORED_CHUNK = 8  # where the sizes cannot be known beforehand

# Per example in a vmapped chunk: the stepped (then shifted) parameters, their gradient, the gradient
# in flight, and the activations (benchmarks/bench_order1.py measures the copies a call takes);
# models with few parameters and large activations need an explicit chunk_size.
PARAMETER_COPIES_PER_EXAMPLE = 5


def _memory_budget(device: torch.device) -> int:
    """Bytes a vmapped chunk may use: half the free memory of a CUDA device, a quarter of the
    available memory on CPU (2 GiB where that cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 2 << 30


def _choose_mode(
    batch_mode: BatchMode,
    chunk_size: int | None,
    num_examples: int,
    device: torch.device,
    parameter_bytes: int,
    callable_loss: bool,
    vmap_refusal: str | None = None,
) -> tuple[Mode, int]:
    """The mode and the number of examples per vmapped call or factored chunk.

    ``"factored"`` reaches here only where it can run (``"auto"`` asks for it then).

    ``"auto"`` takes ``"vmap"`` on CUDA, where batching one-example passes pays, and ``"loop"`` on
    CPU, where the plain-autograd loop is faster and needs a fraction of the memory (ResNet-18,
    ``benchmarks/bench_order1.py``). A callable loss also takes the loop: it would have to be
    written for ``vmap``. The chunk fits :func:`_memory_budget`.
    ``vmap_refusal`` names what torch.func cannot run in this model (a full backward hook):
    ``"vmap"`` is then refused and ``"auto"`` takes the loop.
    """
    if batch_mode not in ("auto", "factored", "loop", "vmap"):
        raise ValueError(
            f"batch_mode must be 'auto', 'factored', 'loop' or 'vmap', got {batch_mode!r}"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if batch_mode == "vmap" and vmap_refusal is not None:
        raise ValueError(
            f"batch_mode='vmap' runs the passes under torch.func.vmap, which cannot run this model: "
            f"{vmap_refusal}. Use batch_mode='loop' (same maps)"
        )
    if batch_mode == "factored":
        return "factored", min(chunk_size or FACTORED_CHUNK, num_examples)
    if batch_mode == "loop" or vmap_refusal is not None:
        return "loop", 1
    if chunk_size is None:
        per_example = PARAMETER_COPIES_PER_EXAMPLE * parameter_bytes
        chunk_size = max(1, _memory_budget(device) // max(per_example, 1))
    chunk_size = min(chunk_size, num_examples)
    if batch_mode == "auto" and (device.type != "cuda" or callable_loss or chunk_size == 1):
        return "loop", 1
    return "vmap", chunk_size


def plan_call(
    batch_mode: BatchMode,
    chunk_size: int | None,
    caller: ForwardCaller,
    forward_func: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    args: tuple,
    loss: LossSpec,
    parameter_bytes: int,
    layer_bytes: dict[tuple, int | None],
) -> Plan:
    """The plan of a call on a non-empty batch, ``batch_mode`` and ``chunk_size`` as the user gave
    them (refused here when invalid); ``layer_bytes`` caches the layer sizes of one example per
    input shape (:func:`_factored_chunk`) from one call to the next."""
    model = caller.model
    hooked = full_backward_hook_owner(model)
    vmap_refusal = None if hooked is None else f"module '{hooked}' has a full backward hook"
    cannot_factor = _factored_refusal(batch_mode, loss, inputs[0].device, model, forward_func)
    if batch_mode == "factored" and cannot_factor is not None:
        raise ValueError(
            f"batch_mode='factored' cannot run this model: {cannot_factor}. Use "
            "batch_mode='loop' (same maps)"
        )
    if cannot_factor is None:
        chunk_size, cannot_factor = _factored_chunk(
            caller, inputs, args, chunk_size, batch_mode, layer_bytes
        )
    mode, chunk = _choose_mode(
        "factored" if batch_mode == "auto" and cannot_factor is None else batch_mode,
        chunk_size,
        inputs[0].shape[0],
        inputs[0].device,
        parameter_bytes,
        callable_loss=loss != "cross_entropy",
        vmap_refusal=vmap_refusal,
    )
    return Plan(mode, chunk, batch_mode, cannot_factor, vmap_refusal)


def _factored_refusal(
    batch_mode: BatchMode,
    loss: LossSpec,
    device: torch.device,
    model: nn.Module,
    forward_func: Callable[..., Tensor],
) -> str | None:
    """Why the factored passes cannot serve this call (None if they can)."""
    if batch_mode not in ("auto", "factored"):
        return "not asked for"
    if batch_mode == "auto" and loss != "cross_entropy":
        # A callable written for one example at a time may not be one for a batch.
        return "a callable loss is called on one example at a time unless asked otherwise"
    if batch_mode == "auto" and device.type != "cpu":
        return "measured on CPU only; 'auto' keeps its choice for CUDA"
    return factored_refusal(model, forward_func)


def _factored_chunk(
    caller: ForwardCaller,
    inputs: tuple[Tensor, ...],
    args: tuple,
    chunk_size: int | None,
    batch_mode: BatchMode,
    layer_bytes: dict[tuple, int | None],
) -> tuple[int | None, str | None]:
    """Examples per factored chunk (the user's ``chunk_size`` if given), and, under ``"auto"``,
    why the loop is the better choice (layers too large per example), from the layer sizes of
    one example (cached in ``layer_bytes`` per input shape)."""
    num_examples = inputs[0].shape[0]
    one = (
        *(x[:1] for x in inputs),
        *(a[:1] if is_per_example(a, num_examples) else a for a in args),
    )
    model = caller.model
    key = (tuple((x.shape[1:], x.dtype) for x in inputs), tuple(map(id, model.modules())))
    if key not in layer_bytes:
        layer_bytes[key] = layer_bytes_per_example(caller, trainable_modules(model), one)
    per_example = layer_bytes[key]
    if batch_mode == "auto" and per_example is not None:
        if per_example > FACTORED_EXAMPLE_BYTES:
            return chunk_size, (
                f"its layers hold {per_example >> 20} MB per example, where the loop is faster"
            )
    if chunk_size is None and per_example:
        # One budget for both products: the exact one keeps pass 1's graph but frees the
        # direction's factors as it goes (the README's measured cost compares the chunk sizes).
        chunk_size = max(1, FACTORED_CHUNK_BYTES // per_example)
    return chunk_size, None


def balanced_chunks(num_examples: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of chunks of at most ``chunk_size`` examples, as equal as they can be: 4
    examples in chunks of at most 3 run as 2 + 2, not 3 + 1, since a chunk of one costs nearly what
    a full one does (the README's measured cost has the figures)."""
    count = -(-num_examples // chunk_size)
    bounds = [num_examples * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def layer_bytes_per_example(
    caller: ForwardCaller, modules: dict[str, nn.Module], forward_args: tuple
) -> int | None:
    """Bytes of the inputs and outputs of the layers with parameters for ONE example (what the
    factored passes keep per example), from a forward pass on the meta device: shapes only, no
    arithmetic. None if the model cannot run on meta tensors."""

    def meta(value: object) -> object:
        return torch.empty_like(value, device="meta") if isinstance(value, Tensor) else value

    state = {name: meta(t) for name, t in caller.named_parameters()}
    state.update({name: meta(t) for name, t in caller.named_buffers()})
    total = 0

    def count(module: nn.Module, args: tuple, output: object) -> None:
        nonlocal total
        for value in (args[0] if args else None, output):
            if isinstance(value, Tensor):
                total += value.numel() * value.element_size()

    handles = [module.register_forward_hook(count) for module in modules.values()]
    try:
        with torch.no_grad():
            functional_call(caller, state, tuple(meta(a) for a in forward_args), strict=False)
    except Exception:  # noqa: BLE001 - an op without a meta kernel: the size is unknown
        return None
    finally:
        for handle in handles:
            handle.remove()
    return total
