"""A tiny ViT trained in the test on a task whose class is decided by an object at a known patch:
NormGrad's maximum falls on the object (pointing game). Grad-CAM at the same layer is printed beside
it, not asserted (it is not this library's claim)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from captum_normgrad import LayerNormGrad, LayerNormGradConv, tokens_to_grid

GRID, PATCH = 4, 4


def striped_objects(count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Dim noise, one striped patch at a random grid cell; class 0 = horizontal stripes, 1 =
    vertical. Returns images, labels and the object's cell (row * GRID + column)."""
    size = GRID * PATCH
    images = 0.3 * torch.rand(count, 3, size, size, generator=generator)
    labels = torch.randint(0, 2, (count,), generator=generator)
    cells = torch.randint(0, GRID * GRID, (count,), generator=generator)
    stripes = (torch.arange(PATCH) % 2).float()
    horizontal, vertical = (
        stripes[:, None].expand(PATCH, PATCH),
        stripes[None, :].expand(PATCH, PATCH),
    )
    for image, label, cell in zip(images, labels, cells.tolist()):
        row, column = divmod(cell, GRID)
        image[:, row * PATCH : (row + 1) * PATCH, column * PATCH : (column + 1) * PATCH] = (
            horizontal if label == 0 else vertical
        )
    return images, labels, cells


def trained_vit() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=GRID * PATCH,
        patch_size=PATCH,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=2,
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        images, labels, _ = striped_objects(32, generator)
        optimiser.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimiser.step()
    return model.eval()


def grad_cam_on_tokens(
    model: nn.Module, layer: nn.Module, images: Tensor, labels: Tensor
) -> Tensor:
    """Grad-CAM by its definition on the token grid: ReLU(sum_c mean_u(dy/dx_c) x_c)."""
    captured = {}
    handle = layer.register_forward_hook(lambda module, args, output: captured.update(x=output))
    try:
        scores = model(images).gather(1, labels[:, None]).sum()
        (gradient,) = torch.autograd.grad(scores, captured["x"])
    finally:
        handle.remove()
    activation = tokens_to_grid(captured["x"].detach())
    weights = tokens_to_grid(gradient).mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1, keepdim=True))


def hits(maps: Tensor, cells: Tensor) -> float:
    return (maps.flatten(1).argmax(dim=1) == cells).float().mean().item()


def test_normgrad_points_at_the_object_in_a_trained_vit(one_thread):
    model = trained_vit()
    images, labels, cells = striped_objects(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = (model(images).argmax(dim=1) == labels).float().mean().item()
    assert accuracy > 0.9, f"the tiny ViT did not learn the task (accuracy {accuracy:.2f})"

    first_ln = model.encoder.layers[0].ln_1
    normgrad = LayerNormGrad(model, first_ln).attribute(images, target=labels)
    grad_cam = grad_cam_on_tokens(model, first_ln, images, labels)
    # The conv form on the patch embedding: each pixel gets its patch's score.
    patch_scores = F.avg_pool2d(
        LayerNormGradConv(model, model.conv_proj).attribute(images, target=labels), PATCH
    )
    depth = {
        "encoder.layers[0] (output)": LayerNormGrad(model, model.encoder.layers[0]),
        "encoder.layers[1].ln_1": LayerNormGrad(model, model.encoder.layers[1].ln_1),
    }
    print(
        f"\npointing game on 64 images, 16 cells (chance 0.06): NormGrad at layers[0].ln_1 "
        f"{hits(normgrad, cells):.2f}, Grad-CAM there {hits(grad_cam, cells):.2f}, conv form on "
        f"conv_proj {hits(patch_scores, cells):.2f}; deeper, after attention mixed the tokens: "
        + ", ".join(
            f"{name} {hits(method.attribute(images, target=labels), cells):.2f}"
            for name, method in depth.items()
        )
    )
    assert hits(normgrad, cells) >= 0.8
    assert hits(patch_scores, cells) >= 0.8
