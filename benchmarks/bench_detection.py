"""Detector NormGrad cost, as ratios measured in one run (issue 23).

For each torchvision detector (random weights, CPU, two images of different sizes with two boxes
each): ``DetectorNormGrad`` at order 0 of the training loss / one training step of the detector on
the same images (forward in training mode + backward to every parameter + an SGD step; target
<= 1.2), order 1 / that step, and the score map of one detection. Then the peak memory above the
loaded model of a training step, of order 0 and of order 1 (each measured in a fresh process).

The map explains one image per call (a batch of one, so its map does not depend on the other
images), where the training step takes both images in one batch; the order-0 backward stops at the
layer and computes no weight gradient.

Timings alternate methods round by round and report medians, since the machine is noisy.

    python benchmarks/bench_detection.py                      # Faster R-CNN (MobileNetV3) and RetinaNet
    python benchmarks/bench_detection.py --models fasterrcnn_mobilenet_v3_large_fpn --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import functools
import json

import torch
from peak_memory import peak_memory_above_setup_mb
from timing import alternating_medians
from torch import nn
from torchvision.models import detection

from captum_normgrad import LayerNormGradOrder1
from captum_normgrad.detection import DetectorNormGrad

# Every candidate kept: random weights score below the default thresholds, and the score map needs
# a detection.
NO_THRESHOLD = {
    "fasterrcnn_mobilenet_v3_large_fpn": {"box_score_thresh": 0.0},
    "retinanet_resnet50_fpn": {"score_thresh": 0.0},
    "fcos_resnet50_fpn": {"score_thresh": 0.0},
}
LAYERS = {
    "fasterrcnn_mobilenet_v3_large_fpn": 'backbone.body["13"]',
    "retinanet_resnet50_fpn": "backbone.body.layer3",
    "fcos_resnet50_fpn": "backbone.body.layer3",
}


def build(model_name: str, size: int) -> tuple[nn.Module, nn.Module]:
    """The detector (eval mode) and its attributed layer."""
    torch.manual_seed(0)
    model = getattr(detection, model_name)(
        weights=None,
        weights_backbone=None,
        min_size=size,
        max_size=size * 5 // 4,
        **NO_THRESHOLD[model_name],
    ).eval()
    layer = eval(f"model.{LAYERS[model_name]}", {"model": model})
    return model, layer


def inputs(size: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(1)
    shapes = [(size, size * 5 // 4), (size * 5 // 4, size)]
    images = [torch.rand(3, h, w, generator=generator) for h, w in shapes]
    targets = [
        {
            "boxes": torch.tensor([[0.1 * w, 0.1 * h, 0.6 * w, 0.7 * h], [0.4 * w, 0.3 * h, w, h]]),
            "labels": torch.tensor([3, 17]),
        }
        for h, w in shapes
    ]
    return images, targets


def methods(model: nn.Module, layer: nn.Module):
    """Each timed call, by name. The training step runs on a copy, with a learning rate of 0: it
    does all a step's work (its cost does not depend on the rate), and every step sees the same
    network as the maps (random weights moved by real steps grow other proposals, at other costs)."""
    trained = copy.deepcopy(model)
    optimiser = torch.optim.SGD(trained.parameters(), lr=0.0)

    def training_step(images, targets):
        trained.train()
        optimiser.zero_grad(set_to_none=True)
        sum(trained(images, targets).values()).backward()
        optimiser.step()

    order0 = DetectorNormGrad(model, layer)
    order1 = DetectorNormGrad(model, layer, method=LayerNormGradOrder1)
    return {
        "training_step": training_step,
        "order0": lambda images, targets: order0.attribute(images, targets=targets),
        "order1": lambda images, targets: order1.attribute(images, targets=targets),
        "order0_score": lambda images, targets: order0.attribute(images, detection=0),
    }


def peak_memory_mb(model_name: str, method: str, size: int) -> float:
    setup = f"""
import bench_detection as bench
model, layer = bench.build({model_name!r}, {size}); images, targets = bench.inputs({size})
method = bench.methods(model, layer)[{method!r}]
"""
    return peak_memory_above_setup_mb(setup, "method(images, targets)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn"],
    )
    parser.add_argument("--size", type=int, default=320, help="min_size; images S x 5S/4, 5S/4 x S")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, 2 images "
        f"{args.size}x{args.size * 5 // 4} and {args.size * 5 // 4}x{args.size}, CPU, "
        f"medians of {args.repeats} alternating rounds"
    )
    for model_name in args.models:
        model, layer = build(model_name, args.size)
        images, targets = inputs(args.size)
        timed = methods(model, layer)
        for method in timed.values():  # warm-up
            method(images, targets)
        median = alternating_medians(
            {name: functools.partial(method, images, targets) for name, method in timed.items()},
            args.repeats,
        )
        print(f"\n{model_name} (layer {LAYERS[model_name]})")
        for name, value in median.items():
            print(f"  {name:<22} {value * 1000:8.0f} ms")
        step = median["training_step"]
        print(f"  order 0 / training step        {median['order0'] / step:.2f}  (target <= 1.2)")
        print(f"  order 1 / training step        {median['order1'] / step:.2f}")
        print(f"  score map / training step      {median['order0_score'] / step:.2f}")
        if not args.no_memory:
            memory = {
                name: peak_memory_mb(model_name, name, args.size)
                for name in ("training_step", "order0", "order1")
            }
            print(
                "  peak memory above the model (MB): "
                + json.dumps({name: round(value) for name, value in memory.items()})
            )


if __name__ == "__main__":
    main()
