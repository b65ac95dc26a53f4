"""Tensor <-> PIL conversions and image grids (sample grids, reconstruction grids, `ldm generate -n N`)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> list of RGB PIL images."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Paste equal-sized images into a grid, row by row (`columns` defaults to a near-square layout)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def pil_to_uint8_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8, the layout TensorBoard's `add_image(..., dataformats="HWC")` takes."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
