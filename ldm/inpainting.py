"""The inpainting contract between training and inference, written once: what a 9-channel inpainting U-Net sees
beside the noisy latents (the layout of Stable Diffusion's inpainting checkpoints), and the grey-hole image users and
evaluations are shown. The fine-tune recipe, the pipeline, `ldm eval inpaint` and the docs script all call these,
because a skew between training and inference here silently ruins a fine-tune.

Masks are (B, 1, H, W) in pixel space, 1 (>= 0.5) = repaint.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def masked_image(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels with the hole set to 0 (mid-grey): the image whose latents condition the U-Net."""
    return pixels * (mask < 0.5)


def mask_at_latent_size(mask: torch.Tensor, latent_size: tuple[int, int], cover: bool = False) -> torch.Tensor:
    """The pixel mask at latent size: nearest-neighbour (what the fine-tune trains on, and diffusers' rule), or with
    `cover` the maximum over each cell, so that a cell any masked pixel touches counts as masked."""
    return F.adaptive_max_pool2d(mask, latent_size) if cover else F.interpolate(mask, size=latent_size)


def encode_masked_image(vae, pixels: torch.Tensor, mask: torch.Tensor,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents of the masked image: a posterior sample (from `generator`, else torch's global RNG)."""
    posterior = vae.encode(masked_image(pixels, mask)).latent_dist
    return posterior.sample(generator) * vae.config.scaling_factor


def unet_conditioning(mask_latents: torch.Tensor, masked_image_latents: torch.Tensor) -> torch.Tensor:
    """The channels appended to the noisy latents: [mask at latent size, masked-image latents]."""
    return torch.cat([mask_latents, masked_image_latents], dim=1)


def grey_hole(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[0, 1] images with the hole mid-grey: the masked image as a user or an evaluation gives it."""
    return (masked_image(images * 2 - 1, mask) + 1) / 2


def grey_hole_image(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`grey_hole` for one PIL image and its PIL mask (white = repaint)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    hole = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)[None, None]
    shown = grey_hole(pixels, hole)[0].permute(1, 2, 0).numpy()
    return Image.fromarray((shown * 255).round().astype("uint8"))

