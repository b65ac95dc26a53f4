"""Autoencoder presets and the pixel <-> latent contract (downsampling factor, latent scaling factor).

The scaling factor is computed from data (1 / std of latents, LDM paper section 4.3.2 / appendix) and stored in the
`AutoencoderKL` config as `scaling_factor`, where diffusers and every later stage read it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from core.errors import UserError

# Each preset maps a data resolution to a latent grid; f = 2 ** (len(block_out_channels) - 1).
PRESETS: dict[str, dict] = {
    "tiny": {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8},  # f2, for tests
    # CPU-sized (the LDM paper's f4/f8 use 128-512 channels and 2 layers per block): 2.7M parameters. 8 norm groups
    # keep at least 4 channels per group, as SD's 128/32: with 32 groups the 32-channel stages normalise each channel
    # alone, which erased per-image colour (docs/evaluation.md, "The autoencoder", has the measurements)
    "kl-f4": {"block_out_channels": (32, 64, 128), "layers_per_block": 1, "norm_num_groups": 8},  # 64 px -> 16
    "kl-f8": {"block_out_channels": (32, 64, 128, 128), "layers_per_block": 1, "norm_num_groups": 8},  # 128 -> 16
}


def build_autoencoder(preset: str, resolution: int, latent_channels: int = 4) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL from a named preset."""
    if preset not in PRESETS:
        raise UserError(f"unknown autoencoder preset '{preset}'; valid: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    blocks = len(spec["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=spec["block_out_channels"],
        layers_per_block=spec["layers_per_block"],
        norm_num_groups=spec["norm_num_groups"],
        latent_channels=latent_channels,
        sample_size=resolution,
        scaling_factor=1.0,
    )


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """Load a diffusers AutoencoderKL folder (ours, or e.g. a Stable Diffusion VAE), safetensors only."""
    path = Path(path)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if (path / "final" / "config.json").is_file():  # the output_dir of train_autoencoder.py
        path = path / "final"
    if not (path / "config.json").is_file():
        raise UserError(f"no autoencoder at {path}: expected a diffusers AutoencoderKL folder with config.json "
                        "(train one with `accelerate launch train_autoencoder.py`)")
    if not (path / "diffusion_pytorch_model.safetensors").is_file():
        raise UserError(f"autoencoder folder {path} has no diffusion_pytorch_model.safetensors "
                        "(only safetensors weights are loaded)")
    return AutoencoderKL.from_pretrained(path, use_safetensors=True)


def encodes_identically(a: AutoencoderKL, b: AutoencoderKL) -> bool:
    """Same encoder (and quant_conv) weights and scaling factor: the same latents for every image, so a U-Net trained
    on one works with the other (e.g. `b` is a decoder-only fine-tune of `a`). Weights are compared in the coarser
    of the two dtypes, so a float32 autoencoder equals its own float16 export."""
    def encoding(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}

    coarser = max(a.dtype, b.dtype, key=lambda d: torch.finfo(d).eps)
    ours, theirs = encoding(a), encoding(b)
    return a.config.scaling_factor == b.config.scaling_factor and ours.keys() == theirs.keys() and all(
        torch.equal(ours[k].to(coarser), theirs[k].to(coarser)) for k in ours)


def downsampling_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along one side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def estimate_scaling_factor(vae: AutoencoderKL, batches) -> float:
    """1 / std of posterior samples over the given image batches, so scaled latents have unit variance."""
    latents = [vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample() for images in batches]
    if not latents:
        raise UserError("cannot compute the latent scaling factor: no images")
    return float(1.0 / torch.cat(latents).float().std())
