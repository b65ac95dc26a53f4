"""Generation arguments checked in one place, for the Python API, the `ldm` command and the page alike.

Every check raises a `UserError` with the fix: types (a bool is not an int, a float is not an int), finite ranges,
seeds in range, prompts as text, images and masks of every accepted kind turned into one form, and limits on the
work one call may ask for. The limits are defaults a user raises on purpose (`Pipeline.limits`, `--max-images`,
`--max-megapixels`); they stop `-n 100000` or a 4000 px photo from exhausting memory or seeming to hang.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from core.data.dataset import to_rgb
from core.errors import UserError

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


@dataclass
class Limits:
    """What one generate call may ask for; raise them on purpose (`pipe.limits = Limits(max_images=1000)`)."""

    max_images: int = 64  # images per call (prompts x num_images)
    max_megapixels: float = 4.0  # per image: 2048 x 2048
    max_total_megapixels: float = 16.0  # per call: e.g. 64 images of 512 x 512

    def check(self, images: int, height: int, width: int) -> None:
        megapixels = height * width / 1e6
        if images > self.max_images:
            raise UserError(f"{images} images in one call is over the limit of {self.max_images}; generate in "
                            f"smaller batches, or raise it on purpose (Pipeline.limits.max_images, --max-images)")
        if megapixels > self.max_megapixels:
            raise UserError(f"{width}x{height} ({megapixels:.1f} MP) is over the limit of {self.max_megapixels:g} "
                            "MP per image; pass a smaller height / width, or raise it on purpose "
                            "(Pipeline.limits.max_megapixels, --max-megapixels)")
        if images * megapixels > self.max_total_megapixels:
            raise UserError(f"{images} images of {width}x{height} ({images * megapixels:.1f} MP) are over the "
                            f"limit of {self.max_total_megapixels:g} MP per call; generate in smaller batches, or "
                            "raise it on purpose (Pipeline.limits.max_total_megapixels)")


def whole(name: str, value, low: int, high: int | None = None) -> int:
    """An integer argument (numpy integers too; not a bool, not a float) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{name} must be a whole number, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise UserError(f"{name} must be {bound}, got {value}")
    return int(value)


def real(name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """A finite real number argument (not a bool) within [low, high] ((low, high] with `low_open`)."""
    if math.isinf(high):
        bound = f"{'>' if low_open else '>='} {low:g}"
    else:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number {bound}, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise UserError(f"{name} must be a number {bound}, got {value:g}")
    return float(value)


def text_list(text, name: str) -> list[str]:
    """A prompt argument as a list of strings that UTF-8 can encode, or a UserError naming what came instead."""
    texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
    if texts is None or not all(isinstance(t, str) for t in texts):
        raise UserError(f"{name} must be a string or a list of strings, got {type(text).__name__}")
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as err:  # e.g. command-line bytes that were not UTF-8 (surrogate escapes)
            raise UserError(f"{name} is not valid UTF-8 text ({err.reason} at character {err.start}); pass "
                            "UTF-8 text") from None
    return texts


def image_input(image, name: str = "image"):
    """An image of any accepted kind in the form the image processor reads correctly: PIL RGB (transparency
    composited on white), or float RGB in [0, 1] as a numpy (B, H, W, 3) array or a torch (B, 3, H, W) tensor.
    numpy and torch uint8 are scaled from [0, 255]; RGBA arrays are composited on white like PIL images."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        array = _unit_range(image, name)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
            raise UserError(f"{name} as a numpy array must be (H, W), (H, W, C) or (B, H, W, C) with C = 1, 3 or "
                            f"4, got shape {image.shape}")
        return _on_white(array, channel_axis=-1)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        tensor = tensor.float() / 255 if tensor.dtype == torch.uint8 else tensor.float()
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4 or tensor.shape[1] not in (1, 3, 4):
            raise UserError(f"{name} as a tensor must be (C, H, W) or (B, C, H, W) with C = 1, 3 or 4, got shape "
                            f"{tuple(image.shape)}")
        _check_unit(tensor.min().item(), tensor.max().item(), name)
        return torch.from_numpy(_on_white(tensor.numpy(), channel_axis=1))
    raise UserError(f"cannot read {name} from {type(image).__name__}; pass a PIL image, a numpy array or a tensor")


def mask_input(mask, name: str = "mask"):
    """A mask of any accepted kind as a PIL L image or float [0, 1] array / tensor (white = repaint). A mask with an
    alpha channel counts transparent pixels as keep: its grey level times its alpha."""
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
            rgba = np.asarray(mask.convert("RGBA"), dtype=np.float32) / 255
            grey = np.asarray(mask.convert("RGBA").convert("L"), dtype=np.float32) / 255
            return Image.fromarray((grey * rgba[..., 3] * 255).round().astype(np.uint8))
        return mask.convert("L")
    if isinstance(mask, np.ndarray):
        array = _unit_range(mask, name)
        if array.ndim == 3 and array.shape[-1] in (2, 4):  # grey or RGB with alpha
            array = array[..., :-1].mean(-1, keepdims=True) * array[..., -1:]
        elif array.ndim == 3 and array.shape[-1] == 3:
            array = array.mean(-1, keepdims=True)
        return array.astype(np.float32)
    if isinstance(mask, torch.Tensor):
        tensor = mask.detach().cpu()
        tensor = tensor.float() / 255 if tensor.dtype == torch.uint8 else tensor.float()
        _check_unit(tensor.min().item(), tensor.max().item(), name)
        return tensor
    raise UserError(f"cannot read {name} from {type(mask).__name__}; pass a PIL image, a numpy array or a tensor")


def _unit_range(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if array.dtype == bool:
        return array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"{name} as a numpy array must be uint8 (0-255), bool or float (0-1), got {array.dtype}")
    _check_unit(float(array.min()), float(array.max()), name)
    return array.astype(np.float32)


def _check_unit(low: float, high: float, name: str) -> None:
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > 1:
        raise UserError(f"{name} values must be in [0, 1] for float input (uint8 for 0-255), got {low:g} to "
                        f"{high:g}")


def _on_white(array: np.ndarray, channel_axis: int) -> np.ndarray:
    """RGB from 1, 3 or 4 channels; an alpha channel composites the colour onto white."""
    array = np.moveaxis(array, channel_axis, -1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        alpha = array[..., 3:]
        array = array[..., :3] * alpha + (1 - alpha)
    return np.ascontiguousarray(np.moveaxis(array, -1, channel_axis)).astype(np.float32)


def guidance_interval(value, sigma_min: float, sigma_max: float) -> tuple[float, float] | None:
    """A limited guidance interval (sigma_lo, sigma_hi] in noise level sigma: two finite numbers, 0 <= lo < hi, that
    overlap the model's [sigma_min, sigma_max] (an interval no step can fall in would silently turn guidance off)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise UserError(f"guidance_interval must be a pair (sigma_lo, sigma_hi), got {value!r}")
    low, high = (real("guidance_interval", v, 0) for v in value)
    if low >= high:
        raise UserError(f"guidance_interval ({low:g}, {high:g}] is empty or reversed: give (sigma_lo, sigma_hi) with "
                        "sigma_lo < sigma_hi")
    if low >= sigma_max or high < sigma_min:
        raise UserError(f"guidance_interval ({low:g}, {high:g}] lies outside this model's noise levels "
                        f"[{sigma_min:.3g}, {sigma_max:.3g}] (sigma): no step would be guided")
    return low, high


def image_size_of(image) -> tuple[int, int]:
    """(height, width) of an image as `image_input` returns it: PIL, (B, H, W, 3) array or (B, 3, H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return tuple(image.shape[1:3]) if isinstance(image, np.ndarray) else tuple(image.shape[-2:])
