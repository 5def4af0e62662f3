"""Order-1 NormGrad cost, as ratios measured in one run (DESIGN.md section 4).

For each model (random weights, CPU, 224x224):
- order 1 (finite difference) / LayerGradCam at the same layer and batch (target <= 5.0), at the
  layer Grad-CAM is made for (the last block) and at the paper's mid-depth layer;
- order 1 / one training step (forward + backward to every parameter) of the same batch: the paper
  counts four such passes per example, plus one forward of the batch to resolve the labels;
- exact Hessian-vector product / finite difference.
Then, on one model at a larger batch: the vmapped batch mode / the per-example loop (throughput,
and peak memory above the loaded model, each measured in a fresh process).

The machine is shared and noisy: each timing is the minimum of ``--repeats`` calls, methods in turn,
after a warm-up on one small image. ``--threads 1`` (default) keeps other jobs from starving
intra-op threads.

    python benchmarks/bench_order1.py                                      # batch 2, ~4 minutes
    python benchmarks/bench_order1.py --models resnet18 --vmap-batch 4     # quick look
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from captum.attr import LayerGradCam
from peak_memory import peak_memory_above_setup_mb
from torch import nn

from captum_normgrad.order1 import LayerNormGradOrder1

# (the layer Grad-CAM is made for, the paper's mid-depth layer: first 3x3 conv of the third block)
LAYERS = {
    "resnet18": ("layer4", "layer3.0.conv1"),
    "resnet50": ("layer4", "layer3.0.conv2"),
    "vgg16": ("features.29", "features.22"),
}


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


def methods(model: nn.Module, model_name: str) -> dict:
    deep, mid = (model.get_submodule(name) for name in LAYERS[model_name])
    return {
        "gradcam_deep": lambda x, t: LayerGradCam(model, deep).attribute(x, target=t),
        "order1_deep": lambda x, t: LayerNormGradOrder1(model, deep).attribute(x, target=t),
        "order1_deep_exact": lambda x, t: LayerNormGradOrder1(model, deep).attribute(
            x, target=t, hvp="exact"
        ),
        "gradcam_mid": lambda x, t: LayerGradCam(model, mid).attribute(x, target=t),
        "order1_mid": lambda x, t: LayerNormGradOrder1(model, mid).attribute(x, target=t),
        "training_step": lambda x, t: training_step(model, x, t),
    }


def batch_mode_call(model: nn.Module, model_name: str, batch_mode: str):
    mid = model.get_submodule(LAYERS[model_name][1])
    return lambda x, t: LayerNormGradOrder1(model, mid).attribute(
        x, target=t, batch_mode=batch_mode, chunk_size=x.shape[0]
    )


def fastest(calls: dict, images: torch.Tensor, target: torch.Tensor, repeats: int) -> dict:
    seconds = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call(images, target)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    return seconds


def peak_memory_mb(model_name: str, batch_mode: str, batch: int, size: int, threads: int) -> float:
    """Peak resident memory of one call above the loaded model and inputs, in a fresh process."""
    setup = f"""
import torch; torch.set_num_threads({threads})
import bench_order1 as bench
model = bench.build({model_name!r}); images, target = bench.inputs({batch}, {size})
call = bench.batch_mode_call(model, {model_name!r}, {batch_mode!r})
"""
    return peak_memory_above_setup_mb(setup, "call(images, target)")


def ratio_line(label: str, value: float, note: str = "") -> str:
    return f"  {label:<44} {value:6.2f}  {note}".rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vgg16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vmap-model", default="resnet18")
    parser.add_argument("--vmap-batch", type=int, default=8)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, "
        f"{args.size}x{args.size}, CPU, min of {args.repeats} call(s) per method"
    )
    warm_images, warm_target = inputs(1, 64)
    for model_name in args.models:
        model = build(model_name)
        calls = methods(model, model_name)
        fastest(calls, warm_images, warm_target, 1)
        seconds = fastest(calls, *inputs(args.batch, args.size), args.repeats)
        deep, mid = LAYERS[model_name]
        print(f"\n{model_name} (deep layer {deep}, mid layer {mid})")
        for name, value in seconds.items():
            print(f"  {name:<22} {value * 1000:8.0f} ms")
        print(
            ratio_line(
                f"order 1 / LayerGradCam at {deep}",
                seconds["order1_deep"] / seconds["gradcam_deep"],
                "(target <= 5.0)",
            )
        )
        print(
            ratio_line(
                f"order 1 / LayerGradCam at {mid}",
                seconds["order1_mid"] / seconds["gradcam_mid"],
                "(target <= 5.0)",
            )
        )
        print(
            ratio_line(
                f"order 1 / training step, at {deep}",
                seconds["order1_deep"] / seconds["training_step"],
                "(paper: 4 passes)",
            )
        )
        print(
            ratio_line(
                f"exact HVP / finite difference, at {deep}",
                seconds["order1_deep_exact"] / seconds["order1_deep"],
            )
        )

    model = build(args.vmap_model)
    calls = {mode: batch_mode_call(model, args.vmap_model, mode) for mode in ("loop", "vmap")}
    fastest(calls, warm_images, warm_target, 1)
    seconds = fastest(calls, *inputs(args.vmap_batch, args.size), args.repeats)
    print(f"\n{args.vmap_model}, batch {args.vmap_batch}, layer {LAYERS[args.vmap_model][1]}")
    for mode, value in seconds.items():
        print(f"  {mode:<6} {value * 1000:8.0f} ms   {args.vmap_batch / value:6.2f} examples/s")
    print(ratio_line("vmap / loop throughput", seconds["loop"] / seconds["vmap"]))
    if not args.no_memory:
        memory = {
            mode: peak_memory_mb(args.vmap_model, mode, args.vmap_batch, args.size, args.threads)
            for mode in ("loop", "vmap")
        }
        print(
            f"  peak memory above the model (MB): loop {memory['loop']:.0f}, "
            f"vmap {memory['vmap']:.0f}"
        )
        print(ratio_line("vmap / loop peak memory", memory["vmap"] / memory["loop"]))


if __name__ == "__main__":
    main()
