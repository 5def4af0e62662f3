"""What laying a layer out from the architecture costs (issue 21): order 0 on a timm ViT with the
layout read from the model, against the same call with the transform given by hand.

Both calls build the method (the registry is read at construction) and attribute; the rounds
alternate the two and the medians are compared (the machine is noisy). Random weights, CPU.

    python benchmarks/bench_layouts.py                    # ViT-Tiny/16 at 224, batch 8
    python benchmarks/bench_layouts.py --batch 2 --rounds 5
"""

from __future__ import annotations

import argparse

import timm
import torch
from timing import alternating_medians

from captum_normgrad import LayerNormGrad, TokensToGrid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(0)
    model = timm.create_model(arguments.model, pretrained=False, num_classes=10).eval()
    size = model.patch_embed.img_size
    images = torch.randn(arguments.batch, 3, *size)
    target = torch.arange(arguments.batch) % 10
    layers = [model.blocks[i].norm1 for i in (2, 5, 8)]
    given = TokensToGrid(model.num_prefix_tokens, tuple(model.patch_embed.grid_size))

    calls = {
        "read from the model": lambda: LayerNormGrad(model, layers).attribute(
            images, target=target
        ),
        "transform given": lambda: LayerNormGrad(model, layers, reshape_transform=given).attribute(
            images, target=target
        ),
    }
    first = [m for m in calls["read from the model"]()]
    second = [m for m in calls["transform given"]()]
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "the two layouts disagree"
    medians = alternating_medians(calls, arguments.rounds)
    print(f"{arguments.model} at {size[0]}x{size[1]}, batch {arguments.batch}, 3 layers")
    for name, value in medians.items():
        print(f"  {name:22s} {value * 1000:7.1f} ms")
    ratio = medians["read from the model"] / medians["transform given"]
    print(f"  read / given           {ratio:7.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
