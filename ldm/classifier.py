"""A time-conditioned classifier of noisy latents, for classifier guidance (Dhariwal & Nichol 2021, section 4).

Built from diffusers' blocks (timestep embedding, ResNet blocks with time input, downsampling), a diffusers
`ModelMixin` so it saves and loads like the other stages; diffusers has no such classifier, hence this file. Its config
records what it was trained on (labels, latent shape, a probe of the autoencoder's latent space, the noise schedule),
so that guidance can refuse a classifier that does not fit the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from core.errors import MissingFileError, UserError

PRESETS = {"tiny": (16, 32), "emoji-s": (64, 128, 128)}


class NoisyLatentClassifier(ModelMixin, ConfigMixin):
    """logits = f(x_t, t): ResNet blocks with the timestep embedding, downsampling between, mean pool, linear."""

    @register_to_config
    def __init__(self, labels: tuple[str, ...] = ("a", "b"), label_column: str = "category", latent_channels: int = 4,
                 latent_size: int = 16, block_out_channels: tuple[int, ...] = (64, 128, 128), norm_num_groups: int = 8,
                 latent_probe: tuple[float, ...] = (), noise_schedule: dict | None = None) -> None:
        super().__init__()
        time_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_dim)
        self.conv_in = nn.Conv2d(latent_channels, block_out_channels[0], kernel_size=3, padding=1)
        blocks, channels = [], block_out_channels[0]
        for i, out in enumerate(block_out_channels):
            blocks.append(ResnetBlock2D(in_channels=channels, out_channels=out, temb_channels=time_dim,
                                        groups=norm_num_groups))
            if i < len(block_out_channels) - 1:  # a strided conv (diffusers' Downsample2D aliases its weights)
                blocks.append(nn.Conv2d(out, out, kernel_size=3, stride=2, padding=1))
            channels = out
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.GroupNorm(norm_num_groups, channels)
        self.head = nn.Linear(channels, len(labels))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        embedding = self.time_embedding(self.time_proj(timesteps.expand(x.shape[0])).to(x.dtype))
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, embedding) if isinstance(block, ResnetBlock2D) else block(h)
        return self.head(nn.functional.silu(self.norm(h)).mean(dim=(2, 3)))

    def label_index(self, label: str) -> int:
        labels = list(self.config.labels)
        if label not in labels:
            raise UserError(f"unknown class label '{label}' for this classifier ({self.config.label_column}); valid: "
                            f"{', '.join(labels)}")
        return labels.index(label)

    def check_fits(self, vae: nn.Module, latent_size: int, resolution: int, scheduler_config: dict) -> None:
        """Refuse a model this classifier was not trained for: another latent shape, autoencoder or noise schedule."""
        config = self.config
        channels = vae.config.latent_channels
        if (config.latent_channels, config.latent_size) != (channels, latent_size):
            raise UserError(f"the classifier was trained on {config.latent_channels}x{config.latent_size}x"
                            f"{config.latent_size} latents; this model samples {channels}x{latent_size}x{latent_size}")
        if not same_latent_space(config.latent_probe, vae, resolution):
            raise UserError("the classifier was trained on another autoencoder's latents (its latent probe differs)")
        schedule = {k: scheduler_config.get(k) for k in ("num_train_timesteps", "beta_schedule", "beta_start",
                                                         "beta_end")}
        if any(config.noise_schedule.get(k) != v for k, v in schedule.items()):
            raise UserError(f"the classifier was trained with noise schedule {config.noise_schedule}, the model "
                            f"uses {schedule}")


def load_classifier(path: str | Path) -> NoisyLatentClassifier:
    """A classifier folder written by train_classifier.py (its output_dir or final/)."""
    folder = Path(path).expanduser()
    if (folder / "final" / "config.json").is_file():
        folder = folder / "final"
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"classifier {path} is not a classifier folder (no config.json); pass the output_dir "
                               "of train_classifier.py")
    return NoisyLatentClassifier.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True)


@torch.no_grad()
def latent_probe(vae: nn.Module, resolution: int) -> list[float]:
    """32 scaled latent values of a fixed seeded image: a fingerprint of the latent space (robust to the fp16 storage
    of the shipped autoencoder, unlike a weight checksum)."""
    image = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = vae.encode(image.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    return [round(float(v), 5) for v in mean.flatten()[:32]]


def same_latent_space(probe: list[float], vae: nn.Module, resolution: int, tolerance: float = 0.02) -> bool:
    return max(abs(a - b) for a, b in zip(probe, latent_probe(vae, resolution))) <= tolerance
