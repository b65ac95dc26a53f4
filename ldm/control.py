"""Control images for ControlNet: the map a ControlNet is conditioned on, computed from an ordinary image.

- "canny": Canny edges with OpenCV (the ecosystem's convention, as diffusers' ControlNet examples compute them:
  `cv2.Canny(image, 100, 200)`, white edges on black, three channels);
- "colour": the image's coarse colour layout (averaged over 8x8 cells, shown at full size): what suits emoji, whose
  identity is much in their colours and rough shapes.

Both take and return PIL images of the same size; the pipelines and the ControlNet recipe call them alike
(`control_tensor` applies them to a training batch, as the latent cache stores them).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from core.errors import UserError
from core.images import tensor_to_pil

CONTROL_TYPES = ("canny", "colour")
CANNY_THRESHOLDS = (100, 200)
COLOUR_CELLS = 8  # the colour layout's cells per side


def control_map(image: Image.Image, kind: str) -> Image.Image:
    """The `kind` control map of `image` (RGB, same size)."""
    if kind not in CONTROL_TYPES:
        raise UserError(f"unknown control type '{kind}'; valid: {', '.join(CONTROL_TYPES)}")
    rgb = image.convert("RGB")
    if kind == "canny":
        import cv2

        edges = cv2.Canny(np.asarray(rgb), *CANNY_THRESHOLDS)
        return Image.fromarray(np.stack([edges] * 3, axis=-1))
    small = rgb.resize((COLOUR_CELLS, COLOUR_CELLS), Image.Resampling.BOX)
    return small.resize(rgb.size, Image.Resampling.NEAREST)


def control_input(image: Image.Image, kind: str, height: int, width: int) -> Image.Image:
    """What a ControlNet is fed for a user's image at the sample size: the image made RGB on white and resized to
    height x width first, then the `kind` detector, as training computes its maps on images at the training size (a
    map detected at full size and shrunk afterwards has faint, smeared edges); kind "none": the image is a ready map,
    resized with nearest so its values stay."""
    from core.data.dataset import to_rgb

    if kind == "none":
        return to_rgb(image).resize((width, height), Image.Resampling.NEAREST)
    return control_map(to_rgb(image).resize((width, height), Image.Resampling.BICUBIC), kind)


def control_tensor(pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, 3, H, W) uint8 control maps of images in [-1, 1] (B, 3, H, W): each image as the 8-bit picture a user
    would pass, then `control_map`; the recipe reads them as uint8 / 255, the scale the pipelines feed."""
    maps = [np.asarray(control_map(image, kind)) for image in tensor_to_pil(pixels)]
    return torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).contiguous()


def controlnet_from_unet(unet, vae_scale_factor: int):
    """A ControlNet initialised from `unet` (diffusers' `ControlNetModel.from_unet`: the encoder's weights copied,
    zero convolutions at the joins), its condition embedding downsampling by the autoencoder's factor so a
    full-size control image meets the latents at their size (Stable Diffusion's f = 8 uses 4 stages; f = 4 takes 3)."""
    from diffusers import ControlNetModel

    stages = vae_scale_factor.bit_length()  # f = 2**k -> k + 1 stages, k of them downsampling
    if vae_scale_factor < 1 or 2 ** (stages - 1) != vae_scale_factor or stages > 4:
        raise UserError(f"a ControlNet needs an autoencoder factor of 1, 2, 4 or 8, got {vae_scale_factor}")
    channels = (16, 32, 96, 256)[:stages]
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
