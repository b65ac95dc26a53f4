"""The checks that make a model folder fit as another model's autoguidance guide (pipelines/guidance.py's
AutoGuidance): the guide's prediction is compared with the main model's at the same x_t, t and prompt, so both must
read the same latents, text states and noise levels and predict the same quantity."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from autoencoder.model import encodes_identically
from core.errors import UserError
from ldm.diffusion import NoiseSchedule
from ldm.text_encoders import load_text_encoder
from pipelines.loading import read_json, text_encoder_spec


def check_guide(pipe, name: str, path: Path, unet: UNet2DConditionModel) -> None:
    """One line naming both sides for the first way the guide at `path` (U-Net `unet`) does not fit `pipe`."""
    main = pipe.model_name
    if pipe.is_consistency_student:
        raise UserError(f"{main} is a consistency-distilled student: it takes the guidance scale as an input and "
                        "cannot be autoguided; use the model it was distilled from")
    if unet.config.get("time_cond_proj_dim") is not None:
        raise UserError(f"guide {name} is a consistency-distilled student; a guide is a smaller text-to-image "
                        "model of the same task (configs/ldm/emoji-64-guide.yaml)")
    if unet.config.in_channels != pipe.unet.config.in_channels:
        raise UserError(f"guide {name}'s U-Net takes {unet.config.in_channels} input channels, {main}'s "
                        f"{pipe.unet.config.in_channels}: a guide must be the same kind of model (text-to-image or "
                        "inpainting)")
    if unet.config.cross_attention_dim != pipe.unet.config.cross_attention_dim:
        raise UserError(f"guide {name} attends to {unet.config.cross_attention_dim}-d text states, {main} to "
                        f"{pipe.unet.config.cross_attention_dim}-d: another text encoder")
    latent = pipe.vae.config.latent_channels
    if unet.config.out_channels not in (latent, 2 * latent):
        raise UserError(f"guide {name}'s U-Net outputs {unet.config.out_channels} channels; {main}'s latents have "
                        f"{latent}")
    check_same_text_encoder(pipe, name, text_encoder_spec(path))
    check_same_schedule(pipe, name, NoiseSchedule.from_scheduler_config(
        read_json(path / "scheduler" / "scheduler_config.json")))
    vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True, torch_dtype=torch.float32)
    if not encodes_identically(vae, pipe.vae):
        raise UserError(f"guide {name}'s autoencoder (scaling_factor {vae.config.scaling_factor:g}) does not encode "
                        f"as {main}'s (scaling_factor {pipe.vae.config.scaling_factor:g}): another latent space")


def check_same_text_encoder(pipe, name: str, spec: tuple[str, int]) -> None:
    """The same padding length, and the same text states for a few probe prompts (the guide's own text encoder is
    loaded only when it is not named as the main model's: two folders each hold their own copy of one encoder)."""
    if spec[1] != pipe.text_encoder.max_length:
        raise UserError(f"guide {name} reads text with {spec[0]} at {spec[1]} tokens, {pipe.model_name} at "
                        f"{pipe.text_encoder.max_length} tokens: a guide must see the same text states")
    if pipe.text_encoder_spec is not None and spec[0] == pipe.text_encoder_spec[0]:
        return
    probes = ["", "a cat", "red apple emoji, twemoji style"]
    with torch.no_grad():
        theirs = load_text_encoder(*spec).encode(probes).hidden_states.float()
        ours = pipe.text_encoder.encode(probes).hidden_states.float().to(theirs.device)
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-3, atol=1e-3):
        raise UserError(f"guide {name}'s text encoder ({spec[0]}) gives other text states than {pipe.model_name}'s: "
                        "a guide must see the same text states")


def check_same_schedule(pipe, name: str, schedule: NoiseSchedule) -> None:
    """The same prediction type and noise levels."""
    ours = pipe.noise_schedule
    if schedule.prediction_type != ours.prediction_type:
        raise UserError(f"guide {name} predicts {schedule.prediction_type}, {pipe.model_name} "
                        f"{ours.prediction_type}: a guide must predict the same quantity")
    if len(schedule.alphas_cumprod) != len(ours.alphas_cumprod) or not torch.allclose(
            schedule.alphas_cumprod, ours.alphas_cumprod, rtol=1e-5, atol=1e-7):
        raise UserError(f"guide {name} was trained on another noise schedule ({schedule.beta_schedule}, "
                        f"{schedule.num_train_timesteps} steps) than {pipe.model_name} ({ours.beta_schedule}, "
                        f"{ours.num_train_timesteps} steps)")
