"""Segmenters: NormGrad of the per-pixel training loss against a mask, of a class region (Captum's
segmentation tutorial) and of the model's own prediction, at every order, against float64 maps
computed by hand from the formula; torchvision's ``{"out": ..., "aux": ...}`` read by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_model_unchanged, model_snapshot
from torch import nn
from torch.func import functional_call
from torchvision.models.segmentation import fcn_resnet50, lraspp_mobilenet_v3_large

from captum_normgrad import (
    LayerNormGrad,
    LayerNormGradAdversarial,
    LayerNormGradConv,
    LayerNormGradOrder1,
    LayerNormGradSelective,
)
from captum_normgrad.metrics import deletion_curve, pointing_game

NUM_CLASSES = 3


class TinySegmenter(nn.Module):
    """Two convolutions and a 1x1 classifier, upsampled; a dict output as torchvision's."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1)
        )
        self.act = nn.Tanh()
        self.classifier = nn.Conv2d(5, NUM_CLASSES, 1)
        self.aux = nn.Conv2d(5, NUM_CLASSES, 1)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear")

    def forward(self, images):
        features = self.act(self.features(images))
        return {
            "out": self.upsample(self.classifier(features)),
            "aux": F.interpolate(self.aux(features), scale_factor=2.0, mode="bilinear"),
        }


@pytest.fixture
def segmenter(one_thread):
    torch.manual_seed(0)
    model = TinySegmenter().double().eval()
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    return model, model.features, images


def _mask_loss(scores, labels):
    """Per example: the mean of -log p(label) over pixels not labelled 255 (written out)."""
    log_p = scores.log_softmax(dim=1)
    valid = labels != 255
    picked = log_p.gather(1, labels.clamp(0, scores.shape[1] - 1)[:, None])[:, 0]
    return -(picked * valid).flatten(1).sum(1) / valid.flatten(1).sum(1)


def _region_labels(scores, classes):
    predicted = scores.argmax(dim=1)
    region = predicted == torch.as_tensor(classes).view(-1, 1, 1)
    return torch.where(region, predicted, torch.full_like(predicted, 255))


def _captum_tutorial_score(scores, classes):
    """Captum's Segmentation_Interpret wrapper: each class summed over the pixels predicted as it,
    then the target's entry selected."""
    selected = torch.zeros_like(scores).scatter_(1, scores.argmax(dim=1, keepdim=True), 1)
    per_class = (scores * selected).sum(dim=(2, 3))
    return per_class.gather(1, torch.as_tensor(classes).view(-1, 1))[:, 0]


def _x_and_g(model, layer, images, objective, params=None):
    """The layer's output and d(sum of per-example objectives)/d output, by hand."""
    captured = {}

    def hook(module, args, output):
        captured["x"] = output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            if params:
                params = {n: p.detach().requires_grad_() for n, p in params.items()}
            call = functional_call(model, params, (images,)) if params else model(images)
            (gradient,) = torch.autograd.grad(objective(call["out"]).sum(), captured["x"])
    finally:
        handle.remove()
    return captured["x"].detach(), gradient


def _norm(t):
    return t.norm(dim=1, keepdim=True)


def _mask(images):
    torch.manual_seed(3)
    mask = torch.randint(0, NUM_CLASSES, (images.shape[0], *images.shape[2:]))
    mask[:, 0] = 255  # VOC's boundary label: ignored
    return mask


def test_mask_target_gives_the_training_loss_map(segmenter):
    model, layer, images = segmenter
    mask = _mask(images)
    maps = LayerNormGrad(model, layer).attribute(images, target=mask)
    x, g = _x_and_g(model, layer, images, lambda s: _mask_loss(s, mask))
    torch.testing.assert_close(maps, _norm(x) * _norm(g))
    assert maps.shape == (3, 1, 4, 4) and maps.abs().max() > 0
    # -100 is ignored as 255 is
    torch.testing.assert_close(
        LayerNormGrad(model, layer).attribute(images, target=mask.masked_fill(mask == 255, -100)),
        maps,
    )


def test_class_target_is_the_cross_entropy_on_the_pixels_predicted_as_it(segmenter):
    model, layer, images = segmenter
    predicted = model(images)["out"].argmax(dim=1)
    classes = [int(p.flatten().mode().values) for p in predicted]
    maps = LayerNormGrad(model, layer).attribute(images, target=classes)
    x, g = _x_and_g(
        model, layer, images, lambda s: _mask_loss(s, _region_labels(s.detach(), classes))
    )
    torch.testing.assert_close(maps, _norm(x) * _norm(g))
    # None: the model's own prediction at every pixel
    maps = LayerNormGrad(model, layer).attribute(images)
    x, g = _x_and_g(model, layer, images, lambda s: _mask_loss(s, s.detach().argmax(dim=1)))
    torch.testing.assert_close(maps, _norm(x) * _norm(g))


def test_output_loss_with_a_class_is_captum_segmentation_tutorial_score(segmenter):
    model, layer, images = segmenter
    predicted = model(images)["out"].argmax(dim=1)
    classes = [int(p.flatten().mode().values) for p in predicted]
    maps = LayerNormGrad(model, layer).attribute(images, target=classes, loss="output")
    x, g = _x_and_g(model, layer, images, lambda s: _captum_tutorial_score(s, classes))
    torch.testing.assert_close(maps, _norm(x) * _norm(g))
    assert maps.abs().max() > 0


def test_each_example_map_is_independent_of_its_batch_mates(segmenter):
    model, layer, images = segmenter
    mask = _mask(images)
    for method, options in ((LayerNormGrad, {}), (LayerNormGradOrder1, {"batch_mode": "loop"})):
        together = method(model, layer).attribute(images, target=mask, **options)
        alone = method(model, layer).attribute(images[1:2], target=mask[1:2], **options)
        torch.testing.assert_close(together[1:2], alone)


def _order1_reference(model, layer, images, labels_of, eps, h_scale, sign=1):
    """The order-1 map per example from the formula: theta' = theta - sign eps grad l,
    m = ||g(theta') - sign eps (g(theta + h v) - g(theta - h v)) / 2h|| ||x(theta')||."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_of(params, image, labels):
        with torch.enable_grad():
            params = {n: p.detach().requires_grad_() for n, p in params.items()}
            scores = functional_call(model, params, (image,))["out"]
            loss = _mask_loss(scores, labels).sum()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        # the auxiliary head is not in the loss: no step for it
        return {n: torch.zeros_like(theta[n]) if g is None else g for n, g in zip(names, grads)}

    maps = []
    for index in range(images.shape[0]):
        image = images[index : index + 1]
        labels = labels_of(model(image)["out"].detach(), index)
        step = loss_of(theta, image, labels)
        stepped = {n: theta[n] - sign * eps * step[n] for n in names}
        direction = loss_of(stepped, image, labels)
        h = h_scale / torch.sqrt(sum((d**2).sum() for d in direction.values()))

        def terms(params, image=image, labels=labels):
            return _x_and_g(model, layer, image, lambda s: _mask_loss(s, labels), params)

        x, g = terms(stepped)
        _, plus = terms({n: theta[n] + h * direction[n] for n in names})
        _, minus = terms({n: theta[n] - h * direction[n] for n in names})
        maps.append(_norm(g - sign * eps * (plus - minus) / (2 * h)) * _norm(x))
    return torch.cat(maps)


@pytest.mark.parametrize("batch_mode", ["loop", "vmap", "factored"])
def test_order1_equals_the_finite_difference_definition(segmenter, batch_mode):
    model, layer, images = segmenter
    mask = _mask(images)
    eps = 1e-2
    maps = LayerNormGradOrder1(model, layer).attribute(
        images, target=mask, eps=eps, batch_mode=batch_mode
    )
    expected = _order1_reference(model, layer, images, lambda _, i: mask[i : i + 1], eps, 0.5)
    torch.testing.assert_close(maps, expected)


def test_order1_class_region_follows_each_example_own_prediction(segmenter):
    """The region of a class is each example's own prediction, not the first example's."""
    model, layer, images = segmenter
    predicted = model(images)["out"].argmax(dim=1)
    classes = [int(p.flatten().mode().values) for p in predicted]
    eps = 1e-2
    maps = LayerNormGradAdversarial(model, layer).attribute(
        images, target=classes, eps=eps, batch_mode="vmap"
    )
    expected = _order1_reference(
        model,
        layer,
        images,
        lambda scores, i: _region_labels(scores, classes[i : i + 1]),
        eps,
        0.5,
        sign=-1,
    )
    torch.testing.assert_close(maps, expected)


@pytest.mark.parametrize(
    "method", [LayerNormGrad, LayerNormGradSelective, LayerNormGradConv, LayerNormGradOrder1]
)
def test_every_method_leaves_the_model_as_it_was(segmenter, method):
    model, _, images = segmenter
    layer = model.features[2]  # a convolution, for LayerNormGradConv too
    model.train()  # no BatchNorm here: train mode changes nothing, and must be left on
    before = model_snapshot(model)
    maps = method(model, layer).attribute(images, target=_mask(images))
    assert maps.shape[:2] == (3, 1) and torch.isfinite(maps).all() and maps.abs().max() > 0
    assert_model_unchanged(model, before)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (torch.zeros(3, 4, 4, dtype=torch.long), r"mask has shape \(3, 4, 4\).*\(3, 8, 8\)"),
        (torch.full((3, 8, 8), 7), r"mask holds class 7, out of range for 3 classes"),
        (torch.full((3, 8, 8), 255), r"example 0 has no labelled pixel"),
        (5, r"target class 5 is out of range for a segmentation output of 3 classes"),
        ((0, 1, 1), r"tuple targets select one output value"),
        (torch.zeros(3, 8, 8), r"integer class indices"),
    ],
)
def test_bad_targets_are_refused_naming_them(segmenter, target, message):
    model, layer, images = segmenter
    for method in (LayerNormGrad, LayerNormGradOrder1):
        with pytest.raises(ValueError, match=message):
            method(model, layer).attribute(images, target=target)


def test_a_class_the_model_predicts_nowhere_is_refused_naming_the_example(segmenter):
    model, layer, images = segmenter
    predicted = model(images)["out"].argmax(dim=1)
    absent = next(c for c in range(NUM_CLASSES) if not (predicted[1] == c).any())
    present = int(predicted[0, 0, 0])
    classes = [present, absent, int(predicted[2, 0, 0])]
    for loss in ("cross_entropy", "output"):
        with pytest.raises(ValueError, match="example 1 has no pixel predicted as the target"):
            LayerNormGrad(model, layer).attribute(images, target=classes, loss=loss)
    with pytest.raises(ValueError, match="example 1 has no pixel predicted as the target"):
        LayerNormGradOrder1(model, layer).attribute(images, target=classes, batch_mode="loop")


def test_torchvision_segmenters_with_random_weights(one_thread):
    """LR-ASPP and FCN (with its auxiliary head: {"out", "aux"}), read by name, against the
    hand-made map."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = torch.randint(0, 4, (2, 32, 32))
    models = [
        (lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4), "8"),
        (fcn_resnet50(weights=None, weights_backbone=None, num_classes=4, aux_loss=True), "layer3"),
    ]
    for model, name in models:
        model = model.double().eval()
        layer = model.backbone[name]
        assert "aux" in model(images) or name == "8"
        maps = LayerNormGrad(model, layer).attribute(images, target=mask)
        x, g = _x_and_g(model, layer, images, lambda s: _mask_loss(s, mask))
        torch.testing.assert_close(maps, _norm(x) * _norm(g))


def test_deletion_curve_tracks_the_class_mean_probability_over_the_pixels(segmenter):
    """A deletion curve on a segmentation score: the class's softmax probability averaged over
    the image's pixels, recomputed on each perturbed image (here, by hand at two steps)."""
    model, layer, images = segmenter
    maps = LayerNormGrad(model, layer).attribute(images, target=_mask(images))
    curve = deletion_curve(model, images, maps, target=[0, 1, 2], n_steps=2, chunk_size=4)

    def score(x, classes):
        probabilities = model(x)["out"].softmax(dim=1)
        return torch.stack([p[c].mean() for p, c in zip(probabilities, classes)])

    upsampled = F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
    ranks = upsampled.flatten(1).argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    half = (ranks < 32).view(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(curve[:, 0], score(images, [0, 1, 2]))
        torch.testing.assert_close(curve[:, 1], score(images.masked_fill(half, 0), [0, 1, 2]))
        torch.testing.assert_close(curve[:, 2], score(torch.zeros_like(images), [0, 1, 2]))
    with pytest.raises(ValueError, match="a segmenter's output .* give the class"):
        deletion_curve(model, images, maps, n_steps=2)


def test_pointing_game_on_a_segmenter_map_with_a_class_mask(segmenter):
    """The pointing game takes the masks the VOC / COCO readers give (here: the class's pixels)."""
    model, layer, images = segmenter
    predicted = model(images)["out"].argmax(dim=1)
    classes = [int(p.flatten().mode().values) for p in predicted]
    maps = LayerNormGrad(model, layer).attribute(images, target=classes)
    upsampled = F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
    peak = upsampled.flatten(1).argmax(dim=1)
    inside = torch.zeros(3, 8, 8, dtype=torch.bool)
    outside = torch.ones(3, 8, 8, dtype=torch.bool)
    for index, flat in enumerate(peak.tolist()):
        inside[index, flat // 8, flat % 8] = True
        outside[index, flat // 8, flat % 8] = False
    assert pointing_game(maps, masks=inside, tolerance=0.5).tolist() == [1.0] * 3
    assert pointing_game(maps, masks=outside, tolerance=0.5).tolist() == [0.0] * 3
