"""Deletion / insertion cost: batched metric vs the forward passes it must run, and vs a naive loop.

The metric must push ``N * (n_steps + 1)`` perturbed images through the model; that forward time,
measured on ready-made chunks of the same size, is the floor. The target is deletion (and insertion)
within 1.3x of it. The naive implementation most code uses loops over examples and steps with a
batch of one. Figures are from one run on a shared machine: noisy.

    python benchmarks/bench_metrics.py                      # the issue's 32 images, 50 steps
    python benchmarks/bench_metrics.py --images 8 --naive-images 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from captum_normgrad import LayerNormGrad
from captum_normgrad.combine import upsample_maps
from captum_normgrad.metrics import deletion_curve, insertion_curve


def seconds(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def forward_floor(model, images, total: int, chunk_size: int) -> float:
    """The model alone on ``total`` images, in chunks of ``chunk_size`` (no image building)."""
    chunk = images[:1].expand(chunk_size, -1, -1, -1).contiguous()
    start = time.perf_counter()
    with torch.no_grad():
        for begin in range(0, total, chunk_size):
            model(chunk[: min(chunk_size, total - begin)])
    return time.perf_counter() - start


def naive_deletion(model, images, maps, labels, n_steps: int) -> torch.Tensor:
    """One example and one step at a time, batch of one: what a straightforward port does."""
    maps = upsample_maps(maps, images.shape[-2:])
    curves = []
    with torch.no_grad():
        for image, saliency, label in zip(images, maps, labels):
            order = saliency.flatten().argsort(descending=True, stable=True)
            pixels = order.numel()
            curve = []
            for step in range(n_steps + 1):
                perturbed = image.clone().flatten(1)
                perturbed[:, order[: step * pixels // n_steps]] = 0
                output = model(perturbed.view(1, *image.shape))
                curve.append(output.softmax(dim=1)[0, label])
            curves.append(torch.stack(curve))
    return torch.stack(curves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--naive-images",
        type=int,
        default=None,
        help="examples for the naive loop (default: all); compared per image",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.randn(args.images, 3, args.size, args.size)
    with torch.no_grad():
        labels = model(images[:2]).argmax(dim=1).repeat(args.images)[: args.images]
    maps = LayerNormGrad(model, model.layer4).attribute(images, target=labels)
    total = args.images * (args.steps + 1)
    print(
        f"ResNet-18 (CPU, {torch.get_num_threads()} threads), {args.images} images "
        f"{args.size}x{args.size}, {args.steps} steps, chunks of {args.chunk_size}: "
        f"{total} images through the model per curve; layer4 NormGrad maps "
        f"({maps.shape[-2]}x{maps.shape[-1]}, upsampled)"
    )

    # Warm-up on every batch shape the runs will see: a full chunk, the last partial one, one image.
    forward_floor(model, images, args.chunk_size + total % args.chunk_size, args.chunk_size)
    with torch.no_grad():
        model(images[:1])

    # Interleaved repeats, minimum of each: the machine is shared; the minimum is least disturbed.
    def curve(kind):
        return lambda: kind(model, images, maps, labels, args.steps, chunk_size=args.chunk_size)

    def free_model(chunk):  # costs ~nothing: what is left is the metric's own work
        return chunk.mean(dim=(2, 3))

    def overhead(kind):
        return lambda: kind(
            free_model, images, maps, labels % 3, args.steps, chunk_size=args.chunk_size
        )

    floors, deletions, insertions, own_work = [], [], [], []
    for _ in range(args.repeats):
        floors.append(forward_floor(model, images, total, args.chunk_size))
        elapsed, curves = seconds(curve(deletion_curve))
        deletions.append(elapsed)
        insertions.append(seconds(curve(insertion_curve))[0])
        own_work.append(seconds(overhead(insertion_curve))[0])
    floor, deletion, insertion = min(floors), min(deletions), min(insertions)
    naive_count = args.naive_images or args.images
    naive, naive_curves = seconds(
        lambda: naive_deletion(
            model, images[:naive_count], maps[:naive_count], labels[:naive_count], args.steps
        )
    )
    naive_per_image = naive / naive_count
    batched_per_image = deletion / args.images
    agreement = (naive_curves - curves[:naive_count]).abs().max().item()
    print(f"(each the minimum of {args.repeats} interleaved runs)")
    print(f"forward floor      {floor:8.2f} s")
    for name, elapsed in (("deletion (zeros) ", deletion), ("insertion (blur) ", insertion)):
        print(f"{name}  {elapsed:8.2f} s   ratio to floor {elapsed / floor:.2f} (target <= 1.3)")
    print(
        f"metric's own work (model replaced by a free one, insertion): {min(own_work):.2f} s "
        f"= {min(own_work) / floor:.3f} of the floor"
    )
    print(
        f"naive loop         {naive:8.2f} s for {naive_count} images   "
        f"per image: naive / batched = {naive_per_image / batched_per_image:.2f}x"
    )
    print(f"naive vs batched curves: max abs difference {agreement:.2e}")


if __name__ == "__main__":
    main()
