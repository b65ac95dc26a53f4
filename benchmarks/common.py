"""Helpers for the side-by-side benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch


def random_default_shaped_model(folder: Path, unet_preset: str = "emoji-l") -> Path:
    """A model folder of the measured shape (kl-f4 autoencoder, the U-Net preset given, MiniLM) and
    random weights: speed does not depend on the weights, and this needs no training."""
    from diffusers import DDPMScheduler

    from autoencoder.model import build_autoencoder
    from ldm.diffusion import NoiseSchedule
    from ldm.text_encoders import load_text_encoder
    from ldm.unet import build_unet
    from pipelines import Pipeline

    torch.manual_seed(0)
    text_encoder = load_text_encoder("minilm", max_length=32)
    vae = build_autoencoder("kl-f4", resolution=64)
    unet = build_unet(unet_preset, latent_size=16, latent_channels=4, cross_attention_dim=text_encoder.hidden_size)
    scheduler = DDPMScheduler(**NoiseSchedule().to_scheduler_config())
    return Pipeline(vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler).save_pretrained(folder)
