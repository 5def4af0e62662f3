"""DetectorNormGrad: NormGrad maps of a torchvision detector's training loss and of one score.

Every map is checked against a float64 reference written from the statement alone
(``tests/detection_models.py``): order 0 of the summed loss dict with BatchNorm frozen and the
sampling seeded, order 1 from its finite-difference definition, and a detection's eval-mode score.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from detection_models import (
    build,
    layer_of,
    loss_map_reference,
    order1_loss_map_reference,
    score_map_reference,
    target_for,
)
from model_state import assert_model_unchanged, model_snapshot
from torch import nn
from torchvision.models import detection

from captum_normgrad import (
    LayerNormGrad,
    LayerNormGradAdversarial,
    LayerNormGradOrder1,
    LayerNormGradSelective,
)
from captum_normgrad.detection import DetectorNormGrad

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detectors() -> dict[str, nn.Module]:
    """Each detector built once per module (random weights, eval mode); tests copy what they
    change."""
    return {}


def detector(detectors, name: str, dtype=torch.float32) -> nn.Module:
    key = (name, dtype)
    if key not in detectors:
        detectors[key] = build(name).to(dtype)
    return detectors[key]


def images_of(dtype=torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.rand(3, 64, 80, generator=generator, dtype=dtype),
        torch.rand(3, 96, 64, generator=generator, dtype=dtype),
    ]


@pytest.mark.parametrize("name", ["faster_rcnn", "retinanet"])
def test_loss_map_is_the_float64_reference(detectors, name):
    model = detector(detectors, name, torch.float64)
    layer = layer_of(model)
    images = images_of(torch.float64)
    targets = [target_for(image) for image in images]
    maps = DetectorNormGrad(model, layer, seed=7).attribute(images, targets=targets)
    for image, target, found in zip(images, targets, maps):
        expected = loss_map_reference(model, layer, image, target, seed=7)
        assert found.dtype == torch.float64 and found.shape == expected.shape
        assert expected.abs().max() > 0
        torch.testing.assert_close(found, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    ("method", "sign"), [(LayerNormGradOrder1, 1), (LayerNormGradAdversarial, -1)]
)
def test_order1_is_its_finite_difference_definition(detectors, method, sign):
    model = detector(detectors, "faster_rcnn", torch.float64)
    layer = layer_of(model)
    image = images_of(torch.float64)[0]
    target = target_for(image)
    eps, h_scale = 0.05, 0.5  # a large step: the correction is far above the tolerance
    (found,) = DetectorNormGrad(model, layer, method=method).attribute(
        [image], targets=[target], eps=eps, h_scale=h_scale
    )
    expected = order1_loss_map_reference(model, layer, image, target, eps, h_scale, sign)
    order0 = loss_map_reference(model, layer, image, target)
    torch.testing.assert_close(found, expected, rtol=1e-7, atol=0)
    assert (expected - order0).abs().max() > 1e-3 * order0.abs().max()


def test_score_map_is_the_reference(detectors):
    model = detector(detectors, "faster_rcnn", torch.float64)
    layer = layer_of(model)
    images = images_of(torch.float64)
    maps = DetectorNormGrad(model, layer).attribute(images, detection=[0, 2])
    for image, index, found in zip(images, [0, 2], maps):
        expected = score_map_reference(model, layer, image, index)
        assert expected.abs().max() > 0
        torch.testing.assert_close(found, expected, rtol=1e-10, atol=0)


def test_images_of_different_sizes_are_each_explained_alone(detectors):
    model = detector(detectors, "faster_rcnn")
    explainer = DetectorNormGrad(model, layer_of(model), method=LayerNormGradSelective)
    images = images_of()
    targets = [target_for(image) for image in images]
    rng = torch.get_rng_state()
    together = explainer.attribute(images, targets=targets)
    assert torch.equal(torch.get_rng_state(), rng), "the caller's generator moved"
    assert [m.shape[-2:] for m in together] == [(2, 3), (3, 2)]
    for image, target, found in zip(images, targets, together):
        assert torch.equal(explainer.attribute([image], targets=[target])[0], found)


def test_the_sampling_is_seeded_by_the_explainer_alone(detectors):
    """Two calls agree whatever the caller's generator holds; another seed samples other
    anchors and proposals, so another map."""
    model = detector(detectors, "faster_rcnn")
    layer = layer_of(model)
    image = images_of()[0]
    targets = [target_for(image)]
    torch.manual_seed(123)
    first = DetectorNormGrad(model, layer, seed=5).attribute([image], targets=targets)[0]
    torch.manual_seed(456)
    second = DetectorNormGrad(model, layer, seed=5).attribute([image], targets=targets)[0]
    other = DetectorNormGrad(model, layer, seed=6).attribute([image], targets=targets)[0]
    assert torch.equal(first, second)
    assert (first - other).abs().max() > 1e-3 * first.abs().max()


def test_a_list_of_layers_and_an_image_without_boxes(detectors):
    """A list of layers gives each image a list of maps, each the single layer's; an image with
    no box (a negative, as torchvision trains on) has a map of its background loss."""
    model = detector(detectors, "faster_rcnn")
    layers = [model.backbone.body["10"], layer_of(model)]
    image = images_of()[0]
    negative = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    for target in (target_for(image), negative):
        (both,) = DetectorNormGrad(model, layers).attribute([image], targets=[target])
        for layer, found in zip(layers, both):
            alone = DetectorNormGrad(model, layer).attribute([image], targets=[target])[0]
            assert torch.equal(found, alone) and found.max() > 0


@pytest.mark.parametrize("name", ["fcos", "ssdlite", "mask_rcnn"])
def test_every_family_gives_a_finite_nonzero_map(detectors, name):
    model = detector(detectors, name)
    image = images_of()[0]
    target = target_for(image, masks=name == "mask_rcnn")
    (found,) = DetectorNormGrad(model, layer_of(model)).attribute([image], targets=[target])
    assert found.dim() == 4 and found.shape[:2] == (1, 1)
    assert torch.isfinite(found).all() and found.max() > 0


def test_the_model_is_left_bit_for_bit(detectors):
    model = copy.deepcopy(detector(detectors, "faster_rcnn")).train()  # BatchNorm in train mode
    model.backbone.body["3"].requires_grad_(False)  # frozen ones stay frozen
    layer = layer_of(model)
    before = model_snapshot(model)
    images = images_of()
    targets = [target_for(image) for image in images]
    for method in (LayerNormGrad, LayerNormGradOrder1):
        DetectorNormGrad(model, layer, method=method).attribute(images[:1], targets=targets[:1])
    DetectorNormGrad(model, layer).attribute(images, detection=0)
    with pytest.raises(ValueError, match="out of range"):
        DetectorNormGrad(model, layer).attribute(images, detection=10_000)
    assert_model_unchanged(model, before)


def _bad(key, value, index=0):
    def change(images, targets):
        targets = [dict(target) for target in targets]
        if value is None:
            del targets[index][key]
        else:
            targets[index][key] = value
        return images, targets

    return change


BOX = torch.tensor([[4.0, 6.0, 40.0, 50.0]])
BAD_TARGETS = {
    "no targets": (lambda i, t: (i, None), ValueError, "targets is None"),
    "one target too few": (lambda i, t: (i, t[:1]), ValueError, "targets has 1 entries for 2"),
    "not a dict": (lambda i, t: (i, [t[0], BOX]), TypeError, r"targets\[1\] must be a dict"),
    "no boxes": (_bad("boxes", None), ValueError, r"targets\[0\] has no \['boxes'\]"),
    "no labels": (_bad("labels", None), ValueError, r"has no \['labels'\]"),
    "boxes (4,)": (_bad("boxes", BOX[0]), ValueError, r"\"boxes\"\] must have shape \(N, 4\)"),
    "integer boxes": (_bad("boxes", BOX.long()), TypeError, "floating-point tensor"),
    "x2 <= x1": (
        _bad("boxes", torch.tensor([[40.0, 6.0, 40.0, 50.0]])),
        ValueError,
        r"\[0\] = \[40.0, 6.0, 40.0, 50.0\] needs x2 > x1",
    ),
    "x2 > W": (
        _bad("boxes", torch.tensor([[4.0, 6.0, 81.0, 50.0]]), 0),
        ValueError,
        "outside the 80 x 64 image",
    ),
    "y2 > H": (
        _bad("boxes", torch.tensor([[4.0, 6.0, 40.0, 97.0]]), 1),
        ValueError,
        r"targets\[1\]\[\"boxes\"\]\[0\] = .* outside the 64 x 96 image",
    ),
    "labels float": (_bad("labels", torch.tensor([3.0, 4.0])), TypeError, "int64 tensor"),
    "labels too few": (_bad("labels", torch.tensor([3])), ValueError, r"shape \(2,\), one per box"),
    "label beyond the classes": (
        _bad("labels", torch.tensor([3, 91])),
        ValueError,
        r"holds \[91\]; this Faster R-CNN takes labels in \[1, 90\]",
    ),
    "background label": (_bad("labels", torch.tensor([0, 3])), ValueError, "0 is its background"),
    "a 2-D image": (lambda i, t: ([i[0][0], i[1]], t), ValueError, r"images\[0\] must be a float"),
    "images a 3-D tensor": (lambda i, t: (i[0], t), ValueError, "images must be a list of"),
    "images a string": (lambda i, t: ("cat.png", t), TypeError, "got str"),
    "integer image": (lambda i, t: ([i[0].byte(), i[1]], t), ValueError, "dtype torch.uint8"),
    "NaN image": (
        lambda i, t: ([i[0], i[1] * float("nan")], t),
        ValueError,
        r"images\[1\] contains NaN",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS), ids=list(BAD_TARGETS))
def test_bad_loss_mode_input_is_refused_naming_it(detectors, case):
    change, error, message = BAD_TARGETS[case]
    model = detector(detectors, "faster_rcnn")
    images = images_of()
    images, targets = change(images, [target_for(image) for image in images])
    with pytest.raises(error, match=message):
        DetectorNormGrad(model, layer_of(model)).attribute(images, targets=targets)


@pytest.mark.parametrize(
    ("name", "label", "message"),
    [
        ("retinanet", 91, r"RetinaNet takes labels in \[0, 90\]"),
        ("fcos", -1, r"FCOS takes labels in \[0, 90\]"),
        ("ssdlite", 91, r"SSD takes labels in \[1, 90\]"),
    ],
)
def test_each_family_knows_its_classes(detectors, name, label, message):
    model = detector(detectors, name)
    image = images_of()[0]
    target = {"boxes": BOX, "labels": torch.tensor([label])}
    with pytest.raises(ValueError, match=message):
        DetectorNormGrad(model, layer_of(model)).attribute([image], targets=[target])


def test_mask_rcnn_targets_need_masks_of_the_image_size(detectors):
    model = detector(detectors, "mask_rcnn")
    image = images_of()[0]
    target = target_for(image, masks=True)
    explainer = DetectorNormGrad(model, layer_of(model))
    with pytest.raises(ValueError, match=r"has no \['masks'\]"):
        explainer.attribute([image], targets=[{k: target[k] for k in ("boxes", "labels")}])
    wrong = {**target, "masks": target["masks"][:, :32]}
    with pytest.raises(ValueError, match=r"\(N_boxes, H, W\) = \(2, 64, 80\), got \(2, 32, 80\)"):
        explainer.attribute([image], targets=[wrong])


def test_bad_score_mode_input_is_refused_naming_it(detectors):
    model = detector(detectors, "faster_rcnn")
    layer = layer_of(model)
    images = images_of()
    explainer = DetectorNormGrad(model, layer)
    with pytest.raises(ValueError, match=r"detection=100 is out of range for images\[0\]"):
        explainer.attribute(images, detection=100)
    with pytest.raises(ValueError, match="detection has 1 entries for 2 images"):
        explainer.attribute(images, detection=[0])
    with pytest.raises(TypeError, match="detection must be an int"):
        explainer.attribute(images, detection=0.5)
    with pytest.raises(ValueError, match="not both"):
        explainer.attribute(images, targets=[target_for(i) for i in images], detection=0)
    with pytest.raises(ValueError, match="LayerNormGradOrder1 takes a step on a training loss"):
        DetectorNormGrad(model, layer, method=LayerNormGradOrder1).attribute(images, detection=0)
    # no detection above the default score threshold on random weights: refused, not zeros
    silent = detector(detectors, "retinanet")
    assert len(silent.eval()([images[0]])[0]["scores"]) > 0  # score_thresh=0 in the fixture
    quiet = copy.deepcopy(silent)
    quiet.score_thresh = 2.0
    with pytest.raises(ValueError, match="returned 0 detections"):
        DetectorNormGrad(quiet, layer_of(quiet)).attribute(images[:1], detection=0)


def test_bad_construction_is_refused_naming_it(detectors):
    model = detector(detectors, "faster_rcnn")
    with pytest.raises(TypeError, match="torchvision detector .* got ResNet"):
        DetectorNormGrad(torchvision.models.resnet18(), model.backbone)
    keypoints = detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    with pytest.raises(TypeError, match="KeypointRCNN, whose loss needs keypoint targets"):
        DetectorNormGrad(keypoints, keypoints.backbone.body.layer3)
    with pytest.raises(TypeError, match="method must be a NormGrad class"):
        DetectorNormGrad(model, layer_of(model), method=torch.nn.Conv2d)
    with pytest.raises(ValueError, match="layer Linear is not a module of the model"):
        DetectorNormGrad(model, nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"sets \['loss'\] itself"):
        DetectorNormGrad(model, layer_of(model)).attribute(
            images_of(), targets=[target_for(i) for i in images_of()], loss="output"
        )
