"""Small random-weight torchvision detectors and the float64 references the detection tests use.

The references are written from the statement alone, sharing no code with the package: the
detector's training objective is ``sum(model([image], [target]).values())`` in training mode with
every BatchNorm in evaluation mode, its sampling seeded with ``torch.manual_seed(seed)`` just
before the pass; the layer's output ``x`` is read by a forward hook and ``g`` is
``torch.autograd.grad`` of that loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torchvision.models import detection

SIZES = {"min_size": 64, "max_size": 96}


def build(name: str) -> nn.Module:
    """A detector with random weights (nothing downloaded), small input sizes, in eval mode."""
    torch.manual_seed(0)
    common = {"weights": None, "weights_backbone": None}
    if name == "faster_rcnn":
        # box_score_thresh 0: random weights score every class about 1/91, below the default.
        # Sampler batches of 16: at 64 x 80 pixels the default ones (256 anchors, 512 proposals)
        # take every candidate, and the sampling would not be random at all.
        return detection.fasterrcnn_mobilenet_v3_large_fpn(
            **common,
            **SIZES,
            box_score_thresh=0.0,
            rpn_batch_size_per_image=16,
            box_batch_size_per_image=16,
        ).eval()
    if name == "retinanet":
        return detection.retinanet_resnet50_fpn(**common, **SIZES, score_thresh=0.0).eval()
    if name == "fcos":
        return detection.fcos_resnet50_fpn(**common, **SIZES).eval()
    if name == "mask_rcnn":
        return detection.maskrcnn_resnet50_fpn(**common, **SIZES).eval()
    if name == "ssdlite":
        return detection.ssdlite320_mobilenet_v3_large(**common).eval()
    raise ValueError(name)


def layer_of(model: nn.Module) -> nn.Module:
    """A backbone stage every family's loss reaches."""
    body = model.backbone.body if hasattr(model.backbone, "body") else None
    if body is None:  # SSDlite: features[0] is the MobileNetV3 trunk up to stride 16
        return model.backbone.features[0]
    return body["13"] if "13" in dict(body.named_children()) else body.layer3


def target_for(image: Tensor, label: int = 3, masks: bool = False) -> dict[str, Tensor]:
    """Two boxes inside the image (one of them the whole image), with labels."""
    height, width = image.shape[-2:]
    target = {
        "boxes": torch.tensor(
            [[4.0, 6.0, width * 0.6, height * 0.7], [0.0, 0.0, float(width), float(height)]],
            dtype=image.dtype,
        ),
        "labels": torch.tensor([label, label + 1]),
    }
    if masks:
        target["masks"] = torch.zeros(2, height, width, dtype=torch.uint8)
        target["masks"][0, 6 : int(height * 0.7), 4 : int(width * 0.6)] = 1
        target["masks"][1] = 1
    return target


def _loss_mode(model: nn.Module) -> dict[nn.Module, bool]:
    flags = {module: module.training for module in model.modules()}
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return flags


def _restore(flags: dict[nn.Module, bool]) -> None:
    for module, training in flags.items():
        module.training = training


def detector_loss(model, image, target, seed, params=None, layer=None) -> tuple[Tensor, Tensor]:
    """The summed loss dict at ``params`` (default: the model's own), and the layer's output
    ``x`` as a fresh leaf the rest of the network reads (so ``d loss / d x`` is ``g``)."""
    saved = {}

    def hook(module, args, output):
        saved["x"] = output.detach().requires_grad_()
        return saved["x"]

    handle = layer.register_forward_hook(hook) if layer is not None else None
    flags = _loss_mode(model)
    try:
        torch.manual_seed(seed)
        with torch.enable_grad():
            if params is None:
                losses = model([image], [target])
            else:
                losses = functional_call(model, params, ([image], [target]), strict=False)
        return sum(losses.values()), saved.get("x")
    finally:
        _restore(flags)
        if handle is not None:
            handle.remove()


def norm_map(activation: Tensor, gradient: Tensor) -> Tensor:
    return activation.norm(dim=1, keepdim=True) * gradient.norm(dim=1, keepdim=True)


def loss_map_reference(model, layer, image, target, seed: int = 0) -> Tensor:
    """Order 0 of the training loss: ``||x||_C * ||d loss / d x||_C``."""
    loss, activation = detector_loss(model, image, target, seed, layer=layer)
    (gradient,) = torch.autograd.grad(loss, activation)
    return norm_map(activation, gradient).detach()


def score_map_reference(model, layer, image, detection_index: int) -> Tensor:
    """Order 0 of the eval-mode score of detection ``detection_index``."""
    saved = {}

    def hook(module, args, output):
        saved["x"] = output.detach().requires_grad_()
        return saved["x"]

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            score = model([image])[0]["scores"][detection_index]
    finally:
        handle.remove()
    (gradient,) = torch.autograd.grad(score, saved["x"])
    return norm_map(saved["x"], gradient).detach()


def order1_loss_map_reference(
    model, layer, image, target, eps: float, h_scale: float, sign: int = 1, seed: int = 0
) -> Tensor:
    """DESIGN.md's order 1 for one image: ``theta' = theta - sign eps grad l(theta)``,
    ``v = grad l(theta')``, ``h = h_scale / ||v||``, the map
    ``||g(theta') - sign eps (g(theta + h v) - g(theta - h v)) / (2h)|| * ||x(theta')||``."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    theta = [p.detach() for name, p in model.named_parameters() if p.requires_grad]

    def loss_gradient(params):
        params = [p.detach().requires_grad_() for p in params]
        loss, _ = detector_loss(model, image, target, seed, dict(zip(names, params)))
        return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)

    def layer_terms(params):
        loss, activation = detector_loss(
            model, image, target, seed, dict(zip(names, params)), layer
        )
        return activation, torch.autograd.grad(loss, activation)[0]

    step = loss_gradient(theta)
    stepped = [p - sign * eps * g for p, g in zip(theta, step)]
    direction = loss_gradient(stepped)
    h = h_scale / torch.sqrt(sum((d**2).sum() for d in direction))
    activation, gradient = layer_terms(stepped)
    _, plus = layer_terms([p + h * d for p, d in zip(theta, direction)])
    _, minus = layer_terms([p - h * d for p, d in zip(theta, direction)])
    corrected = gradient - sign * eps * (plus - minus) / (2 * h)
    return norm_map(activation.detach(), corrected)
