"""Order-0 NormGrad cost, as ratios measured in one run (DESIGN.md section 4).

For each model (random weights, CPU):
- NormGrad / LayerGradCam at the same layer and batch (target <= 1.0);
- NormGrad / a bare forward + backward to that layer, the floor of any gradient method (<= 1.1);
- NormGrad at five layers in one call / NormGrad at the shallowest of them alone (<= 1.2: the
  shallowest layer sets how far the backward pass goes), beside five LayerGradCam calls / one;
- peak memory above the loaded model of each, each measured in a fresh process.

Timings alternate methods round by round and report medians, since the machine is noisy.

    python benchmarks/bench_order0.py                 # ResNet-50 and VGG-16, batch 8, 224x224
    python benchmarks/bench_order0.py --batch 2 --repeats 3 --models resnet50
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import torchvision
from captum.attr import LayerGradCam
from peak_memory import peak_memory_above_setup_mb
from timing import alternating_medians
from torch import nn

from captum_normgrad import LayerNormGrad

FIVE_LAYERS = {
    "resnet50": ["maxpool", "layer1", "layer2", "layer3", "layer4"],
    "vgg16": ["features.3", "features.8", "features.15", "features.22", "features.29"],
}


def build(model_name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, model_name)(weights=None).eval()


def bare_forward_backward(model: nn.Module, layer: nn.Module, images, target) -> torch.Tensor:
    """The floor: one forward saving the layer's output, one backward of the loss to it."""
    saved = {}

    def hook(module, args, output):
        saved["activation"] = output
        return output.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            images = images.requires_grad_()
            loss = nn.functional.cross_entropy(model(images), target, reduction="sum")
            return torch.autograd.grad(loss, saved["activation"])[0]
    finally:
        handle.remove()


def methods(model: nn.Module, model_name: str):
    names = FIVE_LAYERS[model_name]
    layers = [model.get_submodule(name) for name in names]
    deepest, shallowest = layers[-1], layers[0]
    gradcams = [LayerGradCam(model, layer) for layer in layers]
    return {
        "gradcam": lambda x, t: gradcams[-1].attribute(x, target=t),
        "normgrad": lambda x, t: LayerNormGrad(model, deepest).attribute(x, target=t),
        "bare": lambda x, t: bare_forward_backward(model, deepest, x, t),
        "normgrad_shallowest": lambda x, t: LayerNormGrad(model, shallowest).attribute(x, target=t),
        "normgrad_5_layers": lambda x, t: LayerNormGrad(model, layers).attribute(x, target=t),
        "gradcam_5_calls": lambda x, t: [g.attribute(x, target=t) for g in gradcams],
    }


def inputs(batch: int, size: int):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=generator)
    return images, torch.randint(0, 1000, (batch,), generator=generator)


def peak_memory_mb(model_name: str, method: str, batch: int, size: int) -> float:
    """Peak resident memory of one call above the loaded model and inputs, in a fresh process."""
    setup = f"""
import bench_order0 as bench
model = bench.build({model_name!r}); images, target = bench.inputs({batch}, {size})
method = bench.methods(model, {model_name!r})[{method!r}]
"""
    return peak_memory_above_setup_mb(setup, "method(images, target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.size}x{args.size}, CPU, medians of {args.repeats} alternating rounds"
    )
    for model_name in args.models:
        model = build(model_name)
        images, target = inputs(args.batch, args.size)
        timed = methods(model, model_name)
        for method in timed.values():  # warm-up
            method(images, target)
        median = alternating_medians(
            {name: functools.partial(method, images, target) for name, method in timed.items()},
            args.repeats,
        )
        print(
            f"\n{model_name} (deepest layer {FIVE_LAYERS[model_name][-1]}, "
            f"shallowest {FIVE_LAYERS[model_name][0]})"
        )
        for name, value in median.items():
            print(f"  {name:<22} {value * 1000:8.0f} ms")
        print(
            f"  normgrad / gradcam                     {median['normgrad'] / median['gradcam']:.2f}"
            "  (target <= 1.0)"
        )
        print(
            f"  normgrad / bare forward+backward       {median['normgrad'] / median['bare']:.2f}"
            "  (target <= 1.1)"
        )
        ratio = median["normgrad_5_layers"] / median["normgrad_shallowest"]
        print(f"  5 layers in one call / shallowest one  {ratio:.2f}  (target <= 1.2)")
        print(
            f"  5 layers in one call / deepest one     "
            f"{median['normgrad_5_layers'] / median['normgrad']:.2f}"
        )
        print(
            f"  5 LayerGradCam calls / one             "
            f"{median['gradcam_5_calls'] / median['gradcam']:.2f}"
        )
        if not args.no_memory:
            memory = {
                name: peak_memory_mb(model_name, name, args.batch, args.size)
                for name in ("bare", "gradcam", "normgrad", "normgrad_5_layers")
            }
            print(
                "  peak memory above the model (MB): "
                + json.dumps({name: round(value) for name, value in memory.items()})
            )


if __name__ == "__main__":
    main()
