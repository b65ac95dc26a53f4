"""Tensor <-> PIL conversions and image grids (sample grids, reconstruction grids, `ldm generate -n N`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from core.errors import MissingFileError, UserError


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


def captioned_grid(images: torch.Tensor | list[Image.Image], captions: list[str], columns: int = 8,
                   scale: int = 2, caption_height: int = 28) -> Image.Image:
    """A grid with each caption printed under its image (images upscaled `scale` times, nearest neighbour)."""
    from PIL import ImageDraw

    pil = tensor_to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    width, height = pil[0].width * scale, pil[0].height * scale
    rows = math.ceil(len(pil) / columns)
    grid = Image.new("RGB", (columns * width, rows * (height + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(pil, captions)):
        x, y = (i % columns) * width, (i // columns) * (height + caption_height)
        grid.paste(image.resize((width, height), Image.Resampling.NEAREST), (x, y))
        words, lines = caption.split(), [""]
        for word in words:  # wrap to the cell width, at most two lines
            if draw.textlength(f"{lines[-1]} {word}".strip()) > width - 4 and lines[-1]:
                lines.append(word)
            else:
                lines[-1] = f"{lines[-1]} {word}".strip()
        for j, line in enumerate(lines[:2]):
            draw.text((x + 2, y + height + 2 + 12 * j), line, fill="black")
    return grid


def pil_to_uint8_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8, the layout TensorBoard's `add_image(..., dataformats="HWC")` takes."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def open_image(path: str | Path, what: str) -> Image.Image:
    """A user's image file, or a clear error naming `what` (e.g. "--image") when it is missing or not an image."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError as err:
        raise MissingFileError(f"{what} {path} does not exist") from err
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{what} {path} is not an image PIL can read ({err})") from err
    return image
