"""The data-set runner and its table; the adapter for Captum's infidelity and sensitivity_max."""

from __future__ import annotations

import csv
import functools

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from captum.metrics import infidelity, sensitivity_max
from model_state import assert_model_unchanged, model_snapshot
from torch import nn

from captum_normgrad import LayerNormGrad
from captum_normgrad.metrics import (
    MetricsTable,
    class_selectivity,
    confidence_drop,
    deletion_auc,
    evaluate_attributions,
    explanation_scores,
    input_shaped_explanation,
    insertion_auc,
    localization_accuracy,
    localization_iou,
    pointing_game,
    pointing_game_accuracy,
    to_input_shape,
)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.conv2(F.relu(self.conv1(images))))
        return self.fc(features.mean(dim=(2, 3)))


def make_loader():
    batches = []
    for _ in range(2):
        images = torch.randn(3, 3, 16, 16)
        labels = torch.randint(0, 3, (3,))
        boxes = [torch.tensor([[2, 2, 9, 9]]), None, torch.tensor([[0, 4, 16, 12]])]
        batches.append((images, labels, boxes))
    return batches


ALL_METRICS = [
    "deletion",
    "insertion",
    "confidence",
    "pointing_game",
    "localization",
    "selectivity",
]


def test_one_row_per_method_and_layer_with_the_means_of_the_direct_metrics(tmp_path):
    model = SmallNet().eval()
    loader = make_loader()
    normgrad = LayerNormGrad(model, [model.conv1, model.conv2])
    gradcam = LayerGradCam(model, model.conv2)
    methods = {
        "NormGrad": normgrad,
        "Grad-CAM": (gradcam, {"relu_attributions": True}),
        "partial": functools.partial(gradcam.attribute, relu_attributions=True),
    }
    before = model_snapshot(model)
    table = evaluate_attributions(model, methods, loader, ALL_METRICS, n_steps=8, progress=False)
    assert_model_unchanged(model, before)
    assert [(row["method"], row["layer"]) for row in table.rows] == [
        ("NormGrad", "conv1"),
        ("NormGrad", "conv2"),
        ("Grad-CAM", "conv2"),
        ("partial", "conv2"),
    ]
    assert table.columns == [
        "method",
        "layer",
        "examples",
        "deletion_auc",
        "insertion_auc",
        "average_drop",
        "increase_in_confidence",
        "pointing_game",
        "localization_iou",
        "localization_accuracy",
        "selectivity",
    ]
    # The Grad-CAM row equals the metrics computed directly on the examples with ground truth:
    # every number of a row is over the examples every metric could score (issue 9 item 19).
    with_boxes = [0, 2, 3, 5]
    images = torch.cat([batch[0] for batch in loader])[with_boxes]
    labels = torch.cat([batch[1] for batch in loader])[with_boxes]
    boxes = [box for batch in loader for box in batch[2] if box is not None]
    maps = gradcam.attribute(images, target=labels, relu_attributions=True)
    row = table.rows[2]
    assert row["examples"] == 4
    assert all(table_row["examples"] == 4 for table_row in table.rows)
    expected = {
        "deletion_auc": deletion_auc(model, images, maps, labels, n_steps=8).mean(),
        "insertion_auc": insertion_auc(model, images, maps, labels, n_steps=8).mean(),
        "average_drop": confidence_drop(*explanation_scores(model, images, maps, labels)).mean(),
        "pointing_game": pointing_game_accuracy(
            pointing_game(maps, boxes=boxes, image_size=(16, 16)), labels
        ),
        "localization_iou": localization_iou(maps, boxes, (16, 16)).mean(),
        "localization_accuracy": localization_accuracy(localization_iou(maps, boxes, (16, 16))),
    }
    for column, value in expected.items():
        assert row[column] == pytest.approx(value.item(), abs=1e-5), column
    second = model(images).detach().scatter(1, labels[:, None], -torch.inf).argmax(dim=1)
    other_maps = gradcam.attribute(images, target=second, relu_attributions=True)
    selectivity = class_selectivity(maps, other_maps).mean()
    assert row["selectivity"] == pytest.approx(selectivity.item(), abs=1e-5)
    assert table.rows[3] == {**row, "method": "partial"}

    path = tmp_path / "metrics.csv"
    table.to_csv(path)
    with open(path, newline="") as handle:
        saved = list(csv.DictReader(handle))
    assert [entry["layer"] for entry in saved] == table.column("layer")
    assert float(saved[2]["deletion_auc"]) == row["deletion_auc"]
    text = str(table)
    assert "Grad-CAM" in text and "deletion_auc (-)" in text and "insertion_auc (+)" in text


def test_predicted_target_explains_the_models_top_class():
    model = SmallNet().eval()
    images = torch.randn(4, 3, 16, 16)
    seen = []

    def recording(inputs, target=None):
        seen.append(target)
        return inputs.sum(dim=1, keepdim=True)

    loader = [(images, torch.zeros(4, dtype=torch.long))]
    table = evaluate_attributions(
        model, {"input": recording}, loader, ["confidence"], target="predicted", progress=False
    )
    assert torch.equal(seen[0], model(images).argmax(dim=1))
    assert table.rows[0]["layer"] == "-"  # a plain callable names no layer


def test_the_runner_refuses_bad_requests():
    model = SmallNet().eval()
    loader = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))]
    methods = {"NormGrad": LayerNormGrad(model, model.conv2)}
    with pytest.raises(ValueError, match="distinct names"):
        evaluate_attributions(model, methods, loader, ["deletion", "accuracy"], progress=False)
    with pytest.raises(ValueError, match="distinct names"):
        evaluate_attributions(model, methods, loader, ["deletion", "deletion"], progress=False)
    with pytest.raises(ValueError, match="ground_truth"):
        evaluate_attributions(model, methods, loader, ["pointing_game"], progress=False)
    with pytest.raises(ValueError, match="target must be"):
        evaluate_attributions(model, methods, loader, target="top1", progress=False)
    with pytest.raises(ValueError, match="each batch"):
        evaluate_attributions(model, methods, [torch.randn(2, 3, 16, 16)], progress=False)
    with pytest.warns(UserWarning, match="training mode"):
        evaluate_attributions(model.train(), methods, loader, ["confidence"], progress=False)


def test_table_printing_and_column_access():
    table = MetricsTable(["method", "layer", "examples", "deletion_auc"])
    table.rows.append({"method": "m", "layer": "l", "examples": 2, "deletion_auc": 0.123456})
    assert "0.1235" in str(table) and len(table) == 1
    with pytest.raises(KeyError, match="no column"):
        table.column("insertion_auc")


def test_to_input_shape_makes_infidelity_exact_for_a_model_linear_in_the_map():
    # f(x) = sum_c,h,w m[h, w] x[c, h, w]: its exact attribution is the map on every channel,
    # so the infidelity of the adapted map is zero for any perturbation.
    layer_map = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    pixel_weights = F.interpolate(layer_map, (8, 8), mode="bilinear", align_corners=False)
    layer_map = layer_map.expand(2, -1, -1, -1)  # one model, so one map for both examples

    def model(inputs):
        return (inputs * pixel_weights).sum(dim=(1, 2, 3))[:, None]

    def perturb(inputs):
        noise = torch.randn_like(inputs)
        return noise, inputs - noise

    attributions = to_input_shape(layer_map, images)
    assert attributions.shape == images.shape
    assert torch.equal(attributions[:, 0], attributions[:, 2])
    value = infidelity(model, perturb, images, attributions, target=0)
    assert torch.allclose(value, torch.zeros(2, dtype=torch.float64), atol=1e-12)


def test_sensitivity_max_accepts_a_wrapped_layer_method():
    model = SmallNet().eval()
    images = torch.randn(2, 3, 16, 16)
    normgrad = LayerNormGrad(model, model.conv2)
    explain = input_shaped_explanation(normgrad)
    (expanded,) = explain((images,), target=torch.tensor([0, 1]))
    assert torch.equal(expanded, to_input_shape(normgrad.attribute(images, [0, 1]), images))
    sensitivity = sensitivity_max(explain, images, target=torch.tensor([0, 1]))
    assert sensitivity.shape == (2,) and torch.isfinite(sensitivity).all()
    both = input_shaped_explanation(LayerNormGrad(model, [model.conv1, model.conv2]))
    with pytest.raises(ValueError, match="layer_index"):
        both(images, target=0)
    second = input_shaped_explanation(LayerNormGrad(model, [model.conv1, model.conv2]), 1)
    assert torch.equal(second(images, target=0)[0], explain(images, target=0)[0])
    with pytest.raises(ValueError, match="2 examples but the images hold 3"):
        to_input_shape(torch.rand(2, 1, 4, 4), torch.randn(3, 3, 8, 8))


def test_mask_ground_truth_goes_to_the_pointing_game():
    model = SmallNet().eval()
    images = torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, :8], masks[1, 8:] = True, True  # top half, bottom half

    def bright_top(inputs, target=None):
        maps = torch.zeros(inputs.shape[0], 1, 4, 4)
        maps[:, :, 0, 0] = 1.0  # the maximum lands in the top rows
        return maps

    loader = [(images, torch.tensor([0, 1]), masks)]
    table = evaluate_attributions(
        model,
        {"top": bright_top},
        loader,
        ["pointing_game"],
        ground_truth="masks",
        tolerance=1,
        progress=False,
    )
    assert table.rows[0]["pointing_game"] == 0.5  # class 0 hit, class 1 missed


def test_examples_without_ground_truth_are_skipped_not_misses():
    # Issue 9 item 19: localization_accuracy counted the example without boxes as a miss (4/6 for
    # maps that cover every box), and `examples` counted it. Channel 0 of each image is the map.
    boxes = [torch.tensor([[2, 2, 9, 9]]), None, torch.tensor([[0, 4, 16, 12]])]
    images = torch.zeros(3, 3, 16, 16)
    images[0, 0, 2:9, 2:9] = 1
    images[2, 0, 4:12, 0:16] = 1
    labels = torch.tensor([0, 1, 2])

    def box_map(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return inputs[:, :1]

    table = evaluate_attributions(
        SmallNet().eval(), {"box": box_map}, [(images, labels, boxes)], ["localization"],
        progress=False,
    )  # fmt: skip
    (row,) = table.rows
    assert row["examples"] == 2
    assert row["localization_accuracy"] == 1.0
    assert row["localization_iou"] == pytest.approx(1.0, abs=0.05)


def test_no_example_with_ground_truth_is_an_error_naming_the_metric():
    images = torch.zeros(2, 3, 16, 16)
    loader = [(images, torch.tensor([0, 1]), [None, None])]
    with pytest.raises(ValueError, match="pointing_game skipped them all"):
        evaluate_attributions(
            SmallNet().eval(), {"zero": lambda inputs, target: inputs[:, :1]}, loader,
            ["pointing_game"], progress=False,
        )  # fmt: skip
