"""Small torchvision transformers (the same classes as vit_b_16 / swin_t / convnext_tiny, random
weights) and an independent float64 reference for NormGrad on them, written without the library."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.func import functional_call
from torchvision.models.convnext import CNBlockConfig


def tiny_vit(image_size: int = 32, num_classes: int = 5) -> nn.Module:
    """``VisionTransformer`` as vit_b_16, shrunk: patch 8, 2 blocks; a non-zero head (torchvision
    initialises it to zeros, which would make every gradient vanish)."""
    model = torchvision.models.VisionTransformer(
        image_size=image_size,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=num_classes,
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.double().eval()


def tiny_swin(num_classes: int = 5) -> nn.Module:
    """``SwinTransformer`` as swin_t, shrunk: two stages of one block, window 2."""
    model = torchvision.models.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=[2, 2],
        num_classes=num_classes,
    )
    return model.double().eval()


def tiny_convnext(num_classes: int = 5) -> nn.Module:
    model = torchvision.models.ConvNeXt(
        [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=num_classes
    )
    return model.double().eval()


def grid_of(tokens: Tensor, prefix: int, height: int, width: int) -> Tensor:
    """(N, T, C) tokens -> (N, h, w, C), written independently of the library's transform."""
    return tokens[:, prefix:, :].reshape(tokens.shape[0], height, width, tokens.shape[2])


def last_dim_norm(channels_last: Tensor) -> Tensor:
    """(N, *S, C) -> (N, 1, *S): the norm over channels, channels last."""
    return channels_last.norm(dim=-1).unsqueeze(1)


def activation_and_gradient(
    model: nn.Module, layer: nn.Module, images: Tensor, labels: Tensor, parameters=None
) -> tuple[Tensor, Tensor]:
    """The layer's output and the gradient of the summed cross-entropy with respect to it (a
    Hugging Face block's output tuple: its hidden states, the first entry)."""
    captured = {}

    def hook(module, args, output):
        captured["activation"] = output[0] if isinstance(output, tuple) else output
        return output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            if parameters is None:
                outputs = model(images)
            else:
                parameters = {k: v.detach().requires_grad_() for k, v in parameters.items()}
                outputs = functional_call(model, parameters, (images,))
            loss = F.cross_entropy(outputs, labels, reduction="sum")
            (gradient,) = torch.autograd.grad(loss, captured["activation"], allow_unused=True)
    finally:
        handle.remove()
    return captured["activation"].detach(), gradient


def order1_reference(
    model: nn.Module,
    layer: nn.Module,
    images: Tensor,
    labels: Tensor,
    to_channels_last,
    eps: float,
    h_scale: float,
    sign: int = 1,
) -> Tensor:
    """DESIGN.md's order-1 map per example, from the formula with plain autograd.

    ``sign=+1``: theta' = theta - eps grad l, m = ||g(theta') - eps/(2h) (g(theta+hv) - g(theta-hv))||
    ||x(theta')||; ``sign=-1``: the adversarial map (theta' = theta + eps grad l, ``+`` correction).
    ``to_channels_last`` maps the layer's activation to ``(N, *S, C)``.
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    theta = [p.detach() for name, p in model.named_parameters() if p.requires_grad]

    def loss_gradient(params, image, label):
        params = [p.detach().requires_grad_() for p in params]
        with torch.enable_grad():
            outputs = functional_call(model, dict(zip(names, params)), (image,))
            loss = F.cross_entropy(outputs, label, reduction="sum")
            return torch.autograd.grad(loss, params)

    def layer_terms(params, image, label):
        return activation_and_gradient(model, layer, image, label, dict(zip(names, params)))

    maps = []
    for image, label in zip(images.split(1), labels.split(1)):
        step = loss_gradient(theta, image, label)
        stepped = [p - sign * eps * g for p, g in zip(theta, step)]
        direction = loss_gradient(stepped, image, label)
        h = h_scale / torch.sqrt(sum((d**2).sum() for d in direction))
        activation, gradient = layer_terms(stepped, image, label)
        _, plus = layer_terms([p + h * d for p, d in zip(theta, direction)], image, label)
        _, minus = layer_terms([p - h * d for p, d in zip(theta, direction)], image, label)
        corrected = gradient - sign * eps * (plus - minus) / (2 * h)
        maps.append(
            last_dim_norm(to_channels_last(corrected)) * last_dim_norm(to_channels_last(activation))
        )
    return torch.cat(maps)
