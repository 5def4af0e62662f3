"""Training-step cost of the saliency tools, as ratios to a plain training step, in one run.

A step is forward + cross-entropy (mean) + backward + SGD update on torchvision ResNet-18 (random
weights, train mode). Variants:

- monitor: the same step with a NormGradMonitor on layer2, layer3, layer4 (every step recorded).
  Target (DESIGN.md section 4): <= 1.10.
- penalty (Grad-CAM / Guided Grad-CAM / NormGrad at layer4): SaliencyPenalisedLoss, all weights
  trained. Double backpropagation through the map costs what it costs; reported, no target.
- alignment: GuidedGradientAlignment (two input-gradient passes, one with create_graph, then
  double backpropagation).

Each round times plain, variant, variant, plain (so a drifting load cancels); the ratio reported
is the median over rounds. The machine is
shared, so the figures are noisy: read them as +-5%.

Usage: python benchmarks/bench_training.py [--batch 32] [--size 224] [--rounds 5] [--threads N]
(on a loaded machine one thread gives steadier figures than two contended ones).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

from captum_normgrad.training import (
    DifferentiableGradCam,
    DifferentiableGuidedGradCam,
    DifferentiableNormGrad,
    GuidedGradientAlignment,
    NormGradMonitor,
    SaliencyPenalisedLoss,
)


def _plain_step(model, optimiser, images, labels) -> None:
    optimiser.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    optimiser.step()


def _loss_step(loss_fn) -> Callable:
    def step(model, optimiser, images, labels) -> None:
        optimiser.zero_grad()
        loss_fn(images, labels).loss.backward()
        optimiser.step()

    return step


def _seconds(step, model, optimiser, images, labels) -> float:
    start = time.perf_counter()
    step(model, optimiser, images, labels)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-regularisers", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 10, (args.batch,))
    monitor = NormGradMonitor(model, [model.layer2, model.layer3, model.layer4])

    def monitored_step(model, optimiser, images, labels) -> None:
        with monitor:
            _plain_step(model, optimiser, images, labels)

    variants: dict[str, Callable] = {"monitor on 3 layers": monitored_step}
    if not args.skip_regularisers:
        for name, method in [
            ("penalty, Grad-CAM", DifferentiableGradCam),
            ("penalty, Guided Grad-CAM", DifferentiableGuidedGradCam),
            ("penalty, NormGrad", DifferentiableNormGrad),
        ]:
            variants[name] = _loss_step(SaliencyPenalisedLoss(method(model, model.layer4)))
        variants["guided-gradient alignment"] = _loss_step(GuidedGradientAlignment(model))

    for step in [_plain_step, *variants.values()]:  # warm-up
        step(model, optimiser, images, labels)
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    plain_times = []
    for _ in range(args.rounds):
        for name, step in variants.items():
            # plain, variant, variant, plain: a load that drifts during the round cancels out.
            plain = _seconds(_plain_step, model, optimiser, images, labels)
            timed = _seconds(step, model, optimiser, images, labels)
            timed += _seconds(step, model, optimiser, images, labels)
            plain += _seconds(_plain_step, model, optimiser, images, labels)
            plain_times.append(plain / 2)
            ratios[name].append(timed / plain)

    print(
        f"ResNet-18, batch {args.batch}, {args.size}x{args.size}, CPU x{torch.get_num_threads()} "
        f"threads, {args.rounds} rounds; plain step median {statistics.median(plain_times):.3f} s"
    )
    for name, values in ratios.items():
        print(f"  {name:28s} / plain step: {statistics.median(values):.3f}")


if __name__ == "__main__":
    main()
