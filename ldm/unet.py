"""Latent U-Net presets: diffusers `UNet2DConditionModel` with cross-attention to the text encoder's tokens.

The network only sees (noisy latents, timestep, text hidden states); all diffusion math lives in ldm/diffusion.py.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from core.errors import UserError

PRESETS: dict[str, dict] = {
    # a few hundred thousand parameters: tests only
    "tiny": {"block_out_channels": (16, 32), "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 8,
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
    # a guide for autoguidance (pipelines/guidance.py): a much smaller model of the same task, ~0.8M parameters
    "emoji-xs": {"block_out_channels": (16, 32, 64), "layers_per_block": 1, "attention_head_dim": 8,
                 "norm_num_groups": 4,
                 "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},
    # For 16x16x4 latents (kl-f4 at 64 px), sized for CPU training and for shipping inside the repository (fp16:
    # 9.7 / 15.2 / 37 MB). Norm groups keep at least 4 channels per group: with 32 groups a 32-channel stage
    # normalises each channel alone, which erased per-image colour in the autoencoder (docs/evaluation.md).
    "emoji-s": {"block_out_channels": (32, 64, 128), "layers_per_block": 2, "attention_head_dim": 8,
                "norm_num_groups": 8,
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},  # 4.9M parameters
    "emoji-m": {"block_out_channels": (48, 96, 144), "layers_per_block": 2, "attention_head_dim": 8,
                "norm_num_groups": 16,
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},  # 7.6M parameters
    "emoji-l": {"block_out_channels": (64, 128, 256), "layers_per_block": 2, "attention_head_dim": 8,
                "norm_num_groups": 32,
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},  # 18.5M parameters
    # Stable-Diffusion-1-like (860M parameters): for GPU users, documented, not trained here
    "sd-like": {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "attention_head_dim": 8,
                "norm_num_groups": 32,
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},
}


def size_multiple(block_out_channels) -> int:
    """The factor a latent side must divide by: the U-Net downsamples by 2 between its blocks."""
    return 2 ** (len(block_out_channels) - 1)


def build_unet(preset: str, latent_size: int, latent_channels: int, cross_attention_dim: int,
               learned_variance: bool = False) -> UNet2DConditionModel:
    """A freshly initialised conditional U-Net for latents of `latent_size` x `latent_size` x `latent_channels`;
    with `learned_variance` it outputs twice the channels (the prediction, then the variance interpolation)."""
    if preset not in PRESETS:
        raise UserError(f"unknown U-Net preset '{preset}'; valid: {', '.join(PRESETS)}")
    out_channels = 2 * latent_channels if learned_variance else latent_channels
    return UNet2DConditionModel(sample_size=latent_size, in_channels=latent_channels, out_channels=out_channels,
                                cross_attention_dim=cross_attention_dim, **PRESETS[preset])


def inpainting_unet_from(unet: UNet2DConditionModel, latent_channels: int) -> UNet2DConditionModel:
    """The text-to-image U-Net with `conv_in` widened to take [noisy latents, mask, masked-image latents].

    The new input channels start at zero and every other weight (the conv_in bias included) is copied, so at step 0
    the inpainting U-Net predicts exactly what the text-to-image one does (the Stable Diffusion inpainting recipe).
    """
    if unet.config.in_channels != latent_channels:
        raise UserError(f"init_from must be a text-to-image U-Net ({latent_channels} input channels); this one takes "
                        f"{unet.config.in_channels} (already an inpainting model?)")
    old = unet.conv_in
    new = nn.Conv2d(2 * latent_channels + 1, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                    padding=old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :latent_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=2 * latent_channels + 1)
    return unet


def enable_xformers(unet: UNet2DConditionModel) -> None:
    """Switch attention to xformers' memory-efficient kernels (GPU only); SDPA is the default."""
    try:
        import xformers  # noqa: F401
    except ImportError as err:
        raise UserError("attention=xformers needs the xformers package (GPU only): `pip install -e .[xformers]`, "
                        "or use attention=sdpa") from err
    try:
        unet.enable_xformers_memory_efficient_attention()
    except (ValueError, RuntimeError) as err:
        raise UserError(f"xformers attention cannot be enabled here ({err}); use attention=sdpa") from err
