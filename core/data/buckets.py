"""Aspect-ratio buckets (as in SDXL, kohya and OneTrainer): each image goes to the bucket nearest its shape.

A bucket is a (height, width) whose sides are multiples of the autoencoder's factor and whose area is at most the
pixel budget `resolution`^2. An image is resized to cover its bucket and only the remainder is cropped (centred); the
original size and the crop's top-left corner are recorded per image, as SDXL's size/crop conditioning needs them.
With buckets off, there is one square bucket: the resize + centre crop of the shorter side used before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from core.errors import UserError


def make_buckets(resolution: int, factor: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Every (height, width) with sides multiples of `factor`, area <= resolution^2, and long/short side <=
    `max_ratio`: for each short side the longest side that fits the budget, both ways round; sorted by aspect ratio."""
    if resolution % factor:
        raise UserError(f"resolution {resolution} is not a multiple of the autoencoder's factor {factor}")
    if max_ratio < 1:
        raise UserError(f"bucket_max_ratio must be >= 1, got {max_ratio}")
    area = resolution * resolution
    buckets = set()
    for width in range(factor, resolution + 1, factor):  # portrait and square; landscape by transposing
        height = (area // width) // factor * factor
        if height / width <= max_ratio + 1e-9:
            buckets.update({(height, width), (width, height)})
    return sorted(buckets, key=lambda hw: (hw[1] / hw[0], hw[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio, so 2:1 and 1:2 are equally far from 1:1)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - ratio), -hw[0] * hw[1]))


@dataclass(frozen=True)
class Fitted:
    image: Image.Image
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Fitted:
    """Resize `image` to cover `bucket` (height, width) keeping its aspect ratio, then crop the centred remainder."""
    height, width = bucket
    original = (image.height, image.width)
    if (image.width, image.height) == (width, height):
        return Fitted(image, original, (0, 0))
    scale = max(width / image.width, height / image.height)
    new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return Fitted(image.crop((left, top, left + width, top + height)), original, (top, left))


class Bucketer:
    """Chooses each image's bucket: the nearest of `buckets`, or the one square of `resolution` when off."""

    def __init__(self, resolution: int, factor: int, enabled: bool, max_ratio: float = 2.0) -> None:
        self.resolution, self.enabled, self.max_ratio = resolution, enabled, max_ratio
        self.buckets = make_buckets(resolution, factor, max_ratio) if enabled else [(resolution, resolution)]

    def fit(self, image: Image.Image) -> Fitted:
        return fit_to_bucket(image, nearest_bucket(image.width, image.height, self.buckets))

    def spec(self) -> dict:
        """What decides every image's pixels (part of the cache key)."""
        return {"resolution": self.resolution, "buckets": self.buckets if self.enabled else "square"}
