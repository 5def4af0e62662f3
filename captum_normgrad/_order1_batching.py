"""Running the per-example passes of order 1 over a batch: one example at a time, or vmapped chunks.

Every example gets its own inner step, so a batch cannot share one set of stepped parameters. Two
ways to run it give the same maps:

- ``"loop"``: the passes on each example alone (batch dimension 1), plain autograd
  (:mod:`captum_normgrad._order1_loop`). Memory: two copies of the parameters at a time.
- ``"vmap"``: ``torch.func.vmap`` over a chunk of examples; each convolution runs once per pass with
  per-example weights. Memory: about :data:`PARAMETER_COPIES_PER_EXAMPLE` copies of the trainable
  parameters per example in the chunk, so the chunk is sized to fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.func import vmap

from captum_normgrad._order1_passes import ExampleLoss, Parameters, example_terms

__all__ = [
    "PARAMETER_COPIES_PER_EXAMPLE",
    "Batch",
    "BatchMode",
    "balanced_chunks",
    "choose_batch_mode",
    "is_per_example",
    "run_vmapped",
    "target_of_example",
]

BatchMode = Literal["auto", "factored", "loop", "vmap"]

# The factored passes keep each layer's input and output gradient per example and run a chunk as
# one batch. Measured with 2 CPU threads at batch 4 (layer bytes per example, time / the loop's):
# ResNet-18 160x160 (18 MB) 0.5, VGG-16 224 (86 MB) 0.57, MobileNetV2 224 (102 MB) 0.86, ResNet-50
# 224 (167 MB) 0.9 (0.9 at batch 16), with chunks as equal as they can be (3 + 1 examples had cost
# ResNet-50 more than the loop). Larger models were not measured: "auto" takes the factored passes
# up to FACTORED_EXAMPLE_BYTES, and a chunk holds about FACTORED_CHUNK_BYTES of them (ResNet-50,
# batch 16: chunks of 4 or 6 examples 3.55 training steps, of 3 3.87, of 8 4.31).
FACTORED_EXAMPLE_BYTES = 192 << 20
FACTORED_CHUNK_BYTES = 768 << 20
FACTORED_CHUNK = 8  # where the sizes cannot be known beforehand

# Per example in a vmapped chunk: the stepped (then shifted) parameters, their gradient, the gradient
# in flight, and the activations. benchmarks/bench_order1.py measured 3.5 on ResNet-18 at 224x224,
# activations included; models with few parameters and large activations need an explicit chunk_size.
PARAMETER_COPIES_PER_EXAMPLE = 5


def is_per_example(value: object, num_examples: int) -> bool:
    """Captum's convention for additional arguments: a tensor whose first dimension is the batch."""
    return isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == num_examples


@dataclass
class Batch:
    """What the passes read for the whole batch.

    Attributes:
        inputs: the input tensors, batch first.
        per_example_args: the additional forward arguments that are batch-first tensors, in order.
        target: validated labels ``(N,)`` for cross-entropy; the user's ``target`` for a callable.
        buffers: the model's buffers (each pass works on copies).
    """

    inputs: tuple[Tensor, ...]
    per_example_args: tuple[Tensor, ...]
    target: object
    buffers: dict[str, Tensor]


def target_of_example(target: object, index: int, num_examples: int) -> object:
    if is_per_example(target, num_examples):
        return target[index : index + 1]
    if isinstance(target, list) and len(target) == num_examples and num_examples > 1:
        return [target[index]]
    return target


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


def choose_batch_mode(
    batch_mode: BatchMode,
    chunk_size: int | None,
    num_examples: int,
    device: torch.device,
    parameter_bytes: int,
    callable_loss: bool,
    vmap_refusal: str | None = None,
) -> tuple[Literal["factored", "loop", "vmap"], int]:
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


def balanced_chunks(num_examples: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of chunks of at most ``chunk_size`` examples, as equal as they can be: 4
    examples in chunks of at most 3 run as 2 + 2, not 3 + 1, since a chunk of one costs nearly what
    a full one does (ResNet-50, 224x224, 4 examples: 2 + 2 took 0.8-0.9x the time of 3 + 1)."""
    count = -(-num_examples // chunk_size)
    bounds = [num_examples * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _vmapped(
    loss_fn: ExampleLoss,
    theta: Parameters,
    zeros: Sequence[Tensor],
    batch: Batch,
    settings: dict,
    chunk_size: int,
) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    num_examples = batch.inputs[0].shape[0]
    target_batched = isinstance(batch.target, Tensor) and is_per_example(batch.target, num_examples)
    if not target_batched and isinstance(batch.target, list) and len(batch.target) > 1:
        raise ValueError(
            "batch_mode='vmap' with a callable loss needs target as a tensor (one row per "
            "example), an int or None, not a list; pass torch.tensor(target) or batch_mode='loop'"
        )
    in_dims = ({"inputs": 0, "args": 0, "target": 0 if target_batched else None, "buffers": 0},)

    def one_example(example: dict) -> tuple[list[Tensor], list[Tensor]]:
        return example_terms(loss_fn, theta, zeros, example, **settings)

    activations, corrected = [], []
    for start, stop in balanced_chunks(num_examples, chunk_size):
        chunk, size = slice(start, stop), stop - start
        example = {
            # Each vmapped example keeps a batch dimension of 1, as the model expects.
            "inputs": tuple(x[chunk].unsqueeze(1) for x in batch.inputs),
            "args": tuple(a[chunk].unsqueeze(1) for a in batch.per_example_args),
            "target": batch.target[chunk].unsqueeze(1) if target_batched else batch.target,
            # Batched (one per example), so BatchNorm in train mode can update them under vmap.
            "buffers": {n: b.expand(size, *b.shape) for n, b in batch.buffers.items()},
        }
        chunk_activations, chunk_corrected = vmap(one_example, in_dims=in_dims)(example)
        activations.append([a.flatten(0, 1) for a in chunk_activations])
        corrected.append([c.flatten(0, 1) for c in chunk_corrected])
    return activations, corrected


def run_vmapped(
    loss_fn: ExampleLoss,
    theta: Parameters,
    zeros: Sequence[Tensor],
    batch: Batch,
    chunk_size: int,
    learning_rate: float,
    h_scale: float,
    exact_hvp: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer, ``x(theta')`` and the corrected gradient for the whole batch, ``(N, C, *S)``."""
    settings = {"learning_rate": learning_rate, "h_scale": h_scale, "exact_hvp": exact_hvp}
    activations, corrected = _vmapped(loss_fn, theta, zeros, batch, settings, chunk_size)
    return [torch.cat(parts) for parts in zip(*activations)], [
        torch.cat(parts) for parts in zip(*corrected)
    ]
