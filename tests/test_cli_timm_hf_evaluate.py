"""``evaluate --data`` and ``explain`` with timm and Hugging Face models: the model's own view.

The models are tiny and random (timm's ``test_vit``, configured for 160 px with mean = std = 0.5
and ``crop_pct`` 0.95; a two-block Hugging Face ViT for 32 px whose ``preprocessor_config.json``
resizes to 40 and crops 32, with its own mean and std); the data set is five small VOC images
the module writes. Each run is checked against numbers computed here from the model's files by
hand: the deletion curves the command writes (whose first point is the model's probability on
the preprocessed image, the others follow the map's order) and the maps ``explain`` computes.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from cli_fixtures import save_hugging_face_vit
from evaluation_datasets import write_voc
from torchvision.transforms.v2 import functional as TF

from captum_normgrad import LayerNormGrad, data
from captum_normgrad.cli import main
from captum_normgrad.cli._models import load_model
from captum_normgrad.evaluation import VOC_CLASSES, VOCDataset, read_image
from captum_normgrad.metrics import deletion_curve

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

HF_LAYER = "vit.layers.1.layernorm_before"
HF_PROCESSOR = {
    "do_resize": True, "size": {"shortest_edge": 40}, "do_center_crop": True,
    "crop_size": {"height": 32, "width": 32}, "do_normalize": True,
    "image_mean": [0.3, 0.4, 0.5], "image_std": [0.2, 0.25, 0.3],
}  # fmt: skip
TIMM_LAYER = "blocks.5.norm1"
STEPS = 3


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return write_voc(tmp_path_factory.mktemp("data") / "voc")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A two-block ViT for 32 px with VOC's 20 labels and a processor of its own."""
    labels = dict(enumerate(VOC_CLASSES))
    folder = save_hugging_face_vit(tmp_path_factory.mktemp("hf") / "tiny-vit", labels)
    (folder / "preprocessor_config.json").write_text(json.dumps(HF_PROCESSOR))
    return folder


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """timm's ``test_vit`` with 20 classes and its weights as a ``.safetensors`` file."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=20).eval()
    path = tmp_path_factory.mktemp("timm") / "test_vit.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    return model, path


def _view(image: torch.Tensor, resize: int, crop: int, mean, std) -> torch.Tensor:
    """The evaluation view written out: shorter side to ``resize``, centre ``crop``, normalised."""
    resized = TF.resize(image, [resize], antialias=True).clamp(0, 1)
    top, left = (resized.shape[-2] - crop) // 2, (resized.shape[-1] - crop) // 2
    cropped = resized[:, top : top + crop, left : left + crop]
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return ((cropped - mean) / std).unsqueeze(0)


def _expected_curves(forward, layer, voc: Path, limit: int, resize, crop, mean, std) -> dict:
    """(image, class) -> the deletion curve of NormGrad's map on the hand-made view."""
    dataset = VOCDataset(voc)
    curves = {}
    for index in range(limit):
        example = dataset[index]
        classes = dataset.pair_classes(example)
        inputs = _view(read_image(example), resize, crop, mean, std)
        batch = inputs.expand(len(classes), -1, -1, -1).contiguous()
        targets = torch.tensor(classes)
        (maps,) = LayerNormGrad(forward, [layer]).attribute(batch, target=targets)
        curve = deletion_curve(forward, batch, maps, targets, STEPS)
        for name, values in zip([dataset.classes[c] for c in classes], curve):
            curves[(example.image_id, name)] = values.double()
    return curves


def _written_curves(out: Path) -> dict:
    with (out / "per_example.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return {
        (row["image"], row["class"]): torch.tensor(
            [float(value) for value in row["deletion_curve"].split()], dtype=torch.float64
        )
        for row in rows
    }


def _evaluate(voc: Path, out: Path, *arguments: str) -> int:
    return main([
        "evaluate", "--data", f"voc:{voc}", *arguments, "--methods", "normgrad",
        "--metrics", "pointing_game", "deletion", "--steps", str(STEPS), "--limit", "2",
        "--threads", "1", "--dpi", "30", "--out", str(out),
    ])  # fmt: skip


def _assert_same_curves(written: dict, expected: dict, imagenet: dict) -> None:
    assert written.keys() == expected.keys() and len(written) >= 3
    for key, curve in written.items():
        torch.testing.assert_close(curve, expected[key], rtol=1e-5, atol=1e-7)
    # The check can fail: ImageNet's statistics and the default size give other numbers.
    assert any(not torch.allclose(written[k], imagenet[k], rtol=1e-4, atol=0) for k in written)


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits


def test_evaluate_a_hugging_face_folder_with_its_processor(
    voc, hf_folder, tmp_path, capsys, one_thread
):
    out = tmp_path / "out"
    assert _evaluate(voc, out, "--model", f"hf:{hf_folder}", "--layers", HF_LAYER) == 0
    assert f"NormGrad  {HF_LAYER}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["preprocessing"]
    assert (config["resize"], config["crop"]) == (40, 32)
    assert (
        config["mean"] == HF_PROCESSOR["image_mean"] and config["std"] == HF_PROCESSOR["image_std"]
    )
    model = transformers.ViTForImageClassification.from_pretrained(hf_folder).eval()
    forward = _Logits(model)
    layer = model.get_submodule(HF_LAYER)
    view = (40, 32, HF_PROCESSOR["image_mean"], HF_PROCESSOR["image_std"])
    expected = _expected_curves(forward, layer, voc, 2, *view)
    imagenet = _expected_curves(
        forward, layer, voc, 2, 32, 32, data.IMAGENET_MEAN, data.IMAGENET_STD
    )
    _assert_same_curves(_written_curves(out), expected, imagenet)


def test_evaluate_a_timm_model_with_safetensors_weights(voc, timm_vit, tmp_path, one_thread):
    model, weights = timm_vit
    arguments = ["--model", "timm:test_vit", "--weights", str(weights), "--num-classes", "20"]
    out = tmp_path / "out"
    assert _evaluate(voc, out, *arguments, "--layers", TIMM_LAYER) == 0
    settings = model.pretrained_cfg  # read here from the model, not through the library
    side = settings["input_size"][-1]
    resize = round(side / settings["crop_pct"])
    assert (side, resize) != (224, 224) and tuple(settings["mean"]) != data.IMAGENET_MEAN
    layer = model.get_submodule(TIMM_LAYER)
    expected = _expected_curves(
        model, layer, voc, 2, resize, side, settings["mean"], settings["std"]
    )
    imagenet = _expected_curves(
        model, layer, voc, 2, resize, side, data.IMAGENET_MEAN, data.IMAGENET_STD
    )
    _assert_same_curves(_written_curves(out), expected, imagenet)


def test_explain_uses_the_processor_view_and_statistics(
    hf_folder, cat_png, tmp_path, monkeypatch, one_thread
):
    from captum_normgrad.cli import _methods

    recorded = {}
    attribute = _methods.attribute_or_fail

    def recording(method, module, layers, inputs, targets):
        maps = attribute(method, module, layers, inputs, targets)
        recorded.update(inputs=inputs, targets=targets, maps=maps)
        return maps

    monkeypatch.setattr(_methods, "attribute_or_fail", recording)
    arguments = ["explain", "--image", cat_png, "--model", f"hf:{hf_folder}", "--layers", HF_LAYER]
    assert main([*arguments, "--methods", "normgrad", "--out", str(tmp_path), "--dpi", "30"]) == 0
    photo = data.image_to_tensor(matplotlib.image.imread(cat_png))
    cropped = data.center_crop(photo, 32, crop_fraction=32 / 40)  # shorter side 40, crop 32
    mean = torch.tensor(HF_PROCESSOR["image_mean"]).view(3, 1, 1)
    std = torch.tensor(HF_PROCESSOR["image_std"]).view(3, 1, 1)
    inputs = ((cropped - mean) / std).unsqueeze(0)
    torch.testing.assert_close(recorded["inputs"], inputs)
    model = transformers.ViTForImageClassification.from_pretrained(hf_folder).eval()
    (expected,) = LayerNormGrad(model, [model.get_submodule(HF_LAYER)]).attribute(
        inputs, target=recorded["targets"]
    )
    torch.testing.assert_close(recorded["maps"][0], expected)


def _copy_with_processor(folder: Path, destination: Path, processor: dict | str | None) -> str:
    shutil.copytree(folder, destination)
    path = destination / "preprocessor_config.json"
    if processor is None:
        path.unlink()
    else:
        path.write_text(processor if isinstance(processor, str) else json.dumps(processor))
    return f"hf:{destination}"


@pytest.mark.parametrize(
    ("processor", "view"),
    [
        # ViTImageProcessor: a plain resize to height x width (here the shorter side, a square).
        ({"size": {"height": 48, "width": 48}, "image_mean": [0.5], "image_std": [0.5]},
         (48, 1.0, (0.5,) * 3, (0.5,) * 3)),
        # ConvNeXt's: the shortest edge over crop_pct.
        ({"size": {"shortest_edge": 32}, "crop_pct": 0.8, "do_normalize": False},
         (32, 0.8, (0.0,) * 3, (1.0,) * 3)),
        # No processor: the config's image size, ImageNet's view and statistics.
        (None, (32, 0.875, data.IMAGENET_MEAN, data.IMAGENET_STD)),
    ],
)  # fmt: skip
def test_hugging_face_views_are_read_from_the_folder(hf_folder, tmp_path, processor, view):
    model = load_model(_copy_with_processor(hf_folder, tmp_path / "copy", processor))
    assert (model.image_size, model.crop_fraction, model.mean, model.std) == view


def test_a_bad_processor_file_is_named(voc, hf_folder, tmp_path, capsys):
    model = _copy_with_processor(hf_folder, tmp_path / "copy", {"image_mean": [0.5, 0.5]})
    arguments = ["evaluate", "--data", f"voc:{voc}", "--model", model, "--out", str(tmp_path)]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert "preprocessor_config.json: image_mean must be 1 or 3 numbers" in error
    assert error.count("\n") == 1


def _explain_error(capsys, cat_png, tmp_path, *arguments: str) -> str:
    status = main(["explain", "--image", cat_png, "--out", str(tmp_path), *arguments])
    captured = capsys.readouterr()
    assert status == 1 and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


def test_safetensors_weights_that_do_not_fit_are_refused(
    timm_vit, cat_png, tmp_path, capsys, monkeypatch
):
    _, weights = timm_vit
    other = tmp_path / "resnet.safetensors"
    resnet = timm.create_model("test_resnet", pretrained=False, num_classes=20)
    safetensors_torch.save_file(resnet.state_dict(), str(other))
    model = ["--model", "timm:test_vit", "--num-classes", "20"]
    error = _explain_error(capsys, cat_png, tmp_path, *model, "--weights", str(other))
    assert f"weights in {other} are not for the architecture timm:test_vit" in error
    assert "missing (e.g. cls_token)" in error and "unexpected (e.g. bn1." in error
    error = _explain_error(
        capsys, cat_png, tmp_path, "--model", "timm:test_vit", "--weights", str(weights)
    )
    assert "with 20 classes: pass --num-classes 20" in error
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights.read_bytes()[:200])
    error = _explain_error(capsys, cat_png, tmp_path, *model, "--weights", str(truncated))
    assert f"cannot read weights file {truncated} as safetensors" in error
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    error = _explain_error(capsys, cat_png, tmp_path, *model, "--weights", str(weights))
    assert "needs the package 'safetensors'" in error
    assert 'pip install "captum-normgrad[timm]"' in error


@pytest.mark.parametrize(
    ("package", "model", "extra"),
    [("timm", "timm:test_vit", "timm"), ("transformers", "hf:FOLDER", "huggingface")],
)
def test_evaluate_names_a_missing_extra(
    voc, hf_folder, tmp_path, capsys, monkeypatch, package, model, extra
):
    monkeypatch.setitem(sys.modules, package, None)
    model = model.replace("FOLDER", str(hf_folder))
    arguments = ["evaluate", "--data", f"voc:{voc}", "--model", model, "--out", str(tmp_path)]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert f"needs the package '{package}', which is not installed" in error
    assert f'pip install "captum-normgrad[{extra}]"' in error and error.count("\n") == 1
