"""From an image file's pixels to the model's input, remembering where the input came from.

The pointing game is scored at the ORIGINAL image size (TorchRay's protocol), so preprocessing
returns, beside the input, the region of the original image the input covers: the whole image after
a plain resize, the centre square after a crop. A map is brought back onto that region before its
maximum is taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from captum_normgrad.combine import upsample_maps
from captum_normgrad.data import IMAGENET_MEAN, IMAGENET_STD, normalize

__all__ = ["Preprocessing", "Region", "maps_at_original_size"]


@dataclass(frozen=True)
class Region:
    """The rows ``top:top + height`` and columns ``left:left + width`` of the original image."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class Preprocessing:
    """Resize, optional centre crop, normalisation.

    Attributes:
        resize: the shorter side after resizing (torchvision's ``Resize(int)``: the aspect ratio is
            kept), or ``None`` to keep the original size. TorchRay's pointing game: 224, no crop.
        crop: the side of a centre square crop after resizing, or ``None``.
        mean: per-channel mean subtracted from the ``[0, 1]`` image.
        std: per-channel standard deviation it is divided by. TorchRay's VOC / COCO models
            (converted from Caffe) take ``mean=(123.68/255, 116.779/255, 103.939/255)``,
            ``std=(1/255,) * 3`` and ``antialias=False``.
        antialias: antialiased resizing (PIL's and torchvision's default); TorchRay's Caffe
            preprocessing resizes without it.
    """

    resize: int | None = 224
    crop: int | None = None
    mean: Sequence[float] = tuple(IMAGENET_MEAN)
    std: Sequence[float] = tuple(IMAGENET_STD)
    antialias: bool = True

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ValueError(
                f"mean and std need 3 values, std positive; got {self.mean}, {self.std}"
            )

    def __call__(self, image: Tensor) -> tuple[Tensor, Region]:
        """``(3, H, W)`` in ``[0, 1]`` -> the model's ``(1, 3, h, w)`` input and its :class:`Region`."""
        height, width = image.shape[-2:]
        resized = image
        if self.resize is not None:
            resized = TF.resize(image, [self.resize], antialias=self.antialias).clamp(0, 1)
        region = Region(0, 0, height, width)
        if self.crop is not None:
            new_height, new_width = resized.shape[-2:]
            if self.crop > min(new_height, new_width):
                raise ValueError(
                    f"crop {self.crop} is larger than the resized image {new_height}x{new_width}"
                )
            top, left = (new_height - self.crop) // 2, (new_width - self.crop) // 2
            resized = resized[:, top : top + self.crop, left : left + self.crop]
            scale_rows, scale_cols = height / new_height, width / new_width
            region_top, region_left = round(top * scale_rows), round(left * scale_cols)
            region = Region(
                region_top,
                region_left,
                min(height - region_top, max(1, round(self.crop * scale_rows))),
                min(width - region_left, max(1, round(self.crop * scale_cols))),
            )
        return normalize(resized, self.mean, self.std).unsqueeze(0), region


def maps_at_original_size(maps: Tensor, region: Region, size: tuple[int, int]) -> Tensor:
    """``(N, 1, h, w)`` maps of the model's input -> ``(N, 1, H, W)`` over the original image.

    The map is upsampled bilinearly onto ``region`` (TorchRay resizes the saliency to the image
    with ``align_corners=False``); pixels outside it (cropped away) get a value below the map's
    minimum, so the maximum always lies where the model looked.
    """
    maps = maps.detach().float()
    placed = upsample_maps(maps, (region.height, region.width))
    if (region.top, region.left, region.height, region.width) == (0, 0, *size):
        return placed
    floor = placed.flatten(1).min(dim=1).values.view(-1, 1, 1, 1) - 1
    full = floor.expand(-1, 1, *size).clone()
    full[..., region.top : region.top + region.height, region.left : region.left + region.width] = (
        placed
    )
    return full
