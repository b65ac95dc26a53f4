"""What the web page sends, checked and turned into pipeline arguments; no Gradio here (tested without a browser).

Limits keep one request's cost bounded on a shared server; each refusal names its limit.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import UserError
from core.images import open_image
from pipelines.defaults import INPAINT_METHODS as PIPELINE_METHODS
from pipelines.defaults import STEP_SCHEDULES

MAX_SIDE = 512  # pixels; 8x the emoji default's 64, already ~1 min per image on a CPU
MAX_STEPS = 250
MAX_IMAGES = 8
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 1000  # far beyond what the text encoders read (77 tokens), short of a pasted book
MAX_UPLOAD_PIXELS = 16_000_000  # checked from the file header, before the image is decoded
MAX_UPLOAD_MB = 20  # Gradio refuses larger uploads before they reach the handlers
MODEL_SCHEDULER = "model's own"  # the sampler choice that leaves the model folder's scheduler in place
SAMPLER_SPACING = "sampler's own"  # the step-schedule choice that keeps the sampler's spacing
INPAINT_METHODS = ("auto", *PIPELINE_METHODS)  # auto: by the model's U-Net


@dataclass
class Settings:
    """One request's settings, as saved in each PNG's metadata (key "parameters", JSON)."""

    prompt: str
    negative_prompt: str
    sampler: str
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    size: int
    model: str
    lora: str = ""  # the adapter used ("" = none) and its scale
    lora_scale: float = 1.0
    strength: float = 1.0
    method: str = ""
    paste_back: bool = True
    feather: float = 0.0
    guidance_interval: list[float] | None = None  # (sigma_lo, sigma_hi]; None = every step
    step_schedule: str = ""  # "" = the sampler's own spacing
    controlnet: str = ""  # the Control tab: the ControlNet used, its scale and the detector ("none": a ready map)
    controlnet_scale: float = 1.0
    control_type: str = ""

    def pipeline_kwargs(self) -> dict:
        """Pipeline.generate's arguments shared by text-to-image and inpainting."""
        return dict(negative_prompt=self.negative_prompt or None, num_images=self.num_images,
                    num_inference_steps=self.steps, guidance_scale=self.guidance_scale, height=self.size,
                    width=self.size, seed=self.seed, progress=True,
                    scheduler=None if self.sampler == MODEL_SCHEDULER else self.sampler,
                    guidance_interval=None if self.guidance_interval is None else tuple(self.guidance_interval),
                    step_schedule=self.step_schedule or None)


def _whole(name: str, value, low: int, high: int) -> int:
    """`value` as an int in [low, high], or a UserError naming the limit (the page sends floats or None)."""
    if value is None or (isinstance(value, float) and (math.isnan(value) or value != int(value))):
        raise UserError(f"{name} must be a whole number from {low} to {high}, got {value}")
    if not low <= int(value) <= high:
        raise UserError(f"{name} must be from {low} to {high} (the server's limit), got {int(value)}")
    return int(value)


def guidance_interval_from(text: str | None) -> list[float] | None:
    """The page's "LO-HI" interval box as [lo, hi] (blank = None, every step); the pipeline checks the values."""
    if text is None or not text.strip():
        return None
    low, sep, high = text.strip().partition("-")
    try:
        return [float(low), float(high)]
    except ValueError:
        raise UserError(f"the guidance interval is two noise levels LO-HI, e.g. 0.28-5.42 (blank = every step), got "
                        f"'{text[:40]}'") from None


def check_settings(prompt: str | None, negative_prompt: str | None, sampler: str, steps, guidance_scale, seed,
                   random_seed: bool, num_images, size, factor: int, model: str, guidance_interval: str = "",
                   step_schedule: str = SAMPLER_SPACING, **inpaint) -> Settings:
    """Every limit checked before any work; a random seed is drawn here so the PNG records the one used."""
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if text is not None and len(text) > MAX_PROMPT_CHARS:
            raise UserError(f"the {name} is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    steps = _whole("steps", steps, 1, MAX_STEPS)
    num_images = _whole("number of images", num_images, 1, MAX_IMAGES)
    size = _whole("size", size, factor, MAX_SIDE)
    if size % factor:
        raise UserError(f"size must be a multiple of {factor} (the autoencoder's downsampling factor), got {size}")
    if guidance_scale is None or math.isnan(guidance_scale) or not 0 <= guidance_scale <= MAX_GUIDANCE:
        raise UserError(f"guidance must be from 0 to {MAX_GUIDANCE}, got {guidance_scale}")
    if step_schedule not in (SAMPLER_SPACING, *STEP_SCHEDULES):
        raise UserError(f"unknown step schedule '{step_schedule}'; valid: {', '.join(STEP_SCHEDULES)}")
    interval = guidance_interval_from(guidance_interval)
    seed = random.randint(0, MAX_SEED) if random_seed else _whole("seed", seed, 0, MAX_SEED)
    return Settings(prompt=prompt or "", negative_prompt=negative_prompt or "", sampler=sampler, steps=steps,
                    guidance_scale=float(guidance_scale), seed=seed, num_images=num_images, size=size, model=model,
                    guidance_interval=interval, step_schedule="" if step_schedule == SAMPLER_SPACING else step_schedule,
                    **inpaint)


def with_settings(image: Image.Image, settings: Settings, index: int) -> Image.Image:
    """`image` carrying its settings (and its index in the batch) as PNG text; Gradio keeps text chunks in PNGs."""
    image.info["parameters"] = json.dumps({**asdict(settings), "index": index})
    return image


def read_settings(png: str | Path) -> dict:
    """The settings a PNG from the page carries (the inverse of `with_settings`)."""
    return json.loads(Image.open(png).text["parameters"])


def open_upload(path: str | Path, what: str) -> Image.Image:
    """An uploaded image, its size checked from the header before any pixel is decoded (a small file can declare a
    huge image)."""
    try:
        with Image.open(path) as header:
            width, height = header.size
    except Image.DecompressionBombError as err:  # PIL's own guard, far above ours
        raise UserError(f"{what} is over the limit of {MAX_UPLOAD_PIXELS // 1_000_000} megapixels") from err
    except OSError as err:
        raise UserError(f"{what} is not an image this page can read") from err
    if width * height > MAX_UPLOAD_PIXELS:
        raise UserError(f"{what} is {width}x{height} pixels; the limit is {MAX_UPLOAD_PIXELS // 1_000_000} "
                        "megapixels")
    return open_image(path, what)


def public_message(message: str) -> str:
    """A message fit for a visitor: file paths on the server shortened to their file names."""
    return re.sub(r"(?:/[^/\s'\"]+)+/([^/\s'\"]+)", r"\1", message)


def editor_image_and_mask(editor: dict | None, mask_upload: str | None) -> tuple[Image.Image, Image.Image]:
    """The image and mask from the inpaint tab: the editor's background, and either an uploaded mask (resized to
    the image, white = repaint) or what was drawn on the editor's layers (any painted pixel = repaint)."""
    if not editor or not editor.get("background"):
        raise UserError("upload an image to inpaint first")
    image = open_upload(editor["background"], "the uploaded image")
    if mask_upload:
        mask = open_upload(mask_upload, "the uploaded mask").convert("L")
        if mask.size != image.size:
            mask = mask.resize(image.size, Image.Resampling.NEAREST)
        return image, mask
    drawn = np.zeros((image.height, image.width), dtype=bool)
    for layer in editor.get("layers") or []:
        alpha = np.asarray(open_upload(layer, "the drawn mask").convert("RGBA"))[..., 3]
        if alpha.shape != drawn.shape:
            raise UserError(f"the drawn mask is {alpha.shape[1]}x{alpha.shape[0]}, the image "
                            f"{image.width}x{image.height}: clear the canvas and upload the image again")
        drawn |= alpha > 0
    if not drawn.any():
        raise UserError("draw the mask on the image with the brush (white = repaint), or upload a mask image")
    return image, Image.fromarray(drawn.astype(np.uint8) * 255)
