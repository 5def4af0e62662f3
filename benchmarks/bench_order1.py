"""Order-1 NormGrad cost, as ratios measured in one run (DESIGN.md section 4, issue 12).

For each model and batch (random weights, CPU): one training step (forward + backward of the summed
cross-entropy to every parameter, the same batch), order 1 at ``layer3`` with the finite difference
(the paper) as ``batch_mode="auto"`` runs it (the factored passes, for these models) and as the
per-example loop, with ``hvp="exact"``, and ``LayerGradCam`` at the same layer. Printed: order 1 /
training step (target <= 4.0, stretch <= 3.0: the paper's four passes per example, two of which stop
at the layer), the loop / training step, exact / finite difference (target <= 1.0), order 1 /
Grad-CAM. Then on one model and batch: the three batch modes' time and peak memory above the loaded
model (each measured in a fresh process), and the peak memory of the exact product in the loop and
the factored mode.

The machine is shared and noisy: the methods run in alternating rounds (each round calls every
method once, in turn) after a warm-up call each, and the medians over rounds are compared.

    python benchmarks/bench_order1.py                               # the README's table
    python benchmarks/bench_order1.py --models resnet18:160 --batches 4 --rounds 2   # quick look
"""

from __future__ import annotations

import argparse
import functools
import os

import torch
import torchvision
from captum.attr import LayerGradCam
from peak_memory import peak_memory_above_setup_mb
from timing import alternating_medians
from torch import nn

from captum_normgrad.order1 import LayerNormGradOrder1


def build(model_name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, model_name)(weights=None).eval()


def inputs(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=generator)
    return images, torch.randint(0, 1000, (batch,), generator=generator)


def training_step(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> None:
    """One forward and one backward of the summed cross-entropy to every parameter."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(model(images), target, reduction="sum")
        torch.autograd.grad(loss, parameters)


def methods(model: nn.Module, layer_name: str) -> dict:
    layer = model.get_submodule(layer_name)
    order1 = LayerNormGradOrder1(model, layer)
    gradcam = LayerGradCam(model, layer)
    return {
        "training_step": lambda x, t: training_step(model, x, t),
        "order1": lambda x, t: order1.attribute(x, target=t),
        "order1_loop": lambda x, t: order1.attribute(x, target=t, batch_mode="loop"),
        "order1_exact": lambda x, t: order1.attribute(x, target=t, hvp="exact"),
        "gradcam": lambda x, t: gradcam.attribute(x, target=t),
    }


def batch_mode_call(
    model: nn.Module, layer_name: str, batch_mode: str, hvp: str = "finite_difference"
):
    order1 = LayerNormGradOrder1(model, model.get_submodule(layer_name))
    return lambda x, t: order1.attribute(
        x, target=t, batch_mode=batch_mode, chunk_size=x.shape[0], hvp=hvp
    )


def median_seconds(
    calls: dict, images: torch.Tensor, target: torch.Tensor, rounds: int
) -> dict[str, float]:
    """Median over ``rounds`` alternating rounds, after one warm-up call of each on one image."""
    for call in calls.values():
        call(images[:1], target[:1])
    return alternating_medians(
        {name: functools.partial(call, images, target) for name, call in calls.items()}, rounds
    )


def peak_memory_mb(
    model_name: str, layer: str, batch_mode: str, batch: int, size: int, threads: int, hvp: str
) -> float:
    """Peak resident memory of one call above the loaded model and inputs, in a fresh process."""
    setup = f"""
import torch; torch.set_num_threads({threads})
import bench_order1 as bench
model = bench.build({model_name!r}); images, target = bench.inputs({batch}, {size})
call = bench.batch_mode_call(model, {layer!r}, {batch_mode!r}, {hvp!r})
"""
    return peak_memory_above_setup_mb(setup, "call(images, target)")


def ratio_line(label: str, value: float, note: str = "") -> str:
    return f"  {label:<40} {value:6.2f}  {note}".rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18:160", "resnet50:224"])
    parser.add_argument("--batches", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--layer", default="layer3")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vmap-model", default="resnet18:160", help="model of the batch modes")
    parser.add_argument("--vmap-batch", type=int, default=16, help="batch of the batch modes")
    parser.add_argument("--no-vmap", action="store_true", help="skip the batch-mode comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, layer "
        f"{args.layer}, medians of {args.rounds} alternating rounds; load average "
        f"{os.getloadavg()[0]:.2f} at the start"
    )
    for spec in args.models:
        model_name, size = spec.split(":")
        model = build(model_name)
        calls = methods(model, args.layer)
        for batch in args.batches:
            seconds = median_seconds(calls, *inputs(batch, int(size)), args.rounds)
            print(f"\n{model_name} {size}x{size}, batch {batch}")
            print("  " + ", ".join(f"{n} {v * 1000:.0f} ms" for n, v in seconds.items()))
            step = seconds["training_step"]
            print(ratio_line("order 1 / training step", seconds["order1"] / step, "(<= 4.0)"))
            print(
                ratio_line(
                    "order 1, per-example loop / training step", seconds["order1_loop"] / step
                )
            )
            print(ratio_line("order 1 exact / training step", seconds["order1_exact"] / step))
            print(
                ratio_line(
                    "exact HVP / finite difference",
                    seconds["order1_exact"] / seconds["order1"],
                    "(<= 1.0)",
                )
            )
            print(ratio_line("order 1 / LayerGradCam", seconds["order1"] / seconds["gradcam"]))
    if args.no_vmap:
        return
    model_name, size = args.vmap_model.split(":")
    model = build(model_name)
    modes = ("loop", "factored", "vmap")
    calls = {mode: batch_mode_call(model, args.layer, mode) for mode in modes}
    seconds = median_seconds(calls, *inputs(args.vmap_batch, int(size)), args.rounds)
    print(f"\n{model_name} {size}x{size}, batch {args.vmap_batch}, one chunk")
    for mode, value in seconds.items():
        print(f"  {mode:<8} {value * 1000:8.0f} ms")
    print(ratio_line("factored / loop time", seconds["factored"] / seconds["loop"]))
    print(ratio_line("vmap / loop time", seconds["vmap"] / seconds["loop"]))
    measured = [(mode, "finite_difference") for mode in modes]
    measured += [("loop", "exact"), ("factored", "exact")]
    memory = {
        (mode, hvp): peak_memory_mb(
            model_name, args.layer, mode, args.vmap_batch, int(size), args.threads, hvp
        )
        for mode, hvp in measured
    }
    print(
        "  peak memory above the model (MB): "
        + ", ".join(f"{mode} {hvp} {value:.0f}" for (mode, hvp), value in memory.items())
    )
    print(f"  load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
