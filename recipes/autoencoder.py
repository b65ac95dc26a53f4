"""Training recipe for the first stage: `accelerate launch train_autoencoder.py --config ... [key=value ...]`.

The loop is core/trainer.py; this file says what the stage builds, its loss (reconstruction + KL + perceptual, and
once `disc_start` is reached a patch-GAN term), its reconstruction grids and its export: a diffusers AutoencoderKL
folder whose config carries the latent scaling factor computed from the training data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch
from PIL import Image
from torch import nn
from torch.func import functional_call

from autoencoder.discriminator import (PatchDiscriminator, adaptive_gan_weight, generator_gan_loss,
                                       hinge_discriminator_loss)
from autoencoder.losses import autoencoder_loss
from autoencoder.model import build_autoencoder, estimate_scaling_factor, load_autoencoder
from autoencoder.perceptual import PERCEPTUAL_CHOICES, make_perceptual
from core.accelerator import all_ranks_true
from core.data.dataset import ImageCaptionDataset, load_image_caption_dataset
from core.data.validation import held_out_indices, spread, validation_rows, without
from core.errors import UserError
from core.images import make_grid, tensor_to_pil
from core.trainer import TrainConfig, Trainer

logger = logging.getLogger(__name__)


@dataclass
class AutoencoderTrainConfig(TrainConfig):
    """Every setting of an autoencoder run; saved as config.yaml beside each checkpoint and the export."""

    renamed: ClassVar[dict[str, str]] = {"preset": "autoencoder_preset",  # old spellings still read
                                         "val_split": "validation_split"}

    batch_size: int = 16
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    weight_decay: float = 0.0
    use_ema: bool = False
    resolution: int = 64
    autoencoder_preset: str = "kl-f4"  # autoencoder/model.py PRESETS
    latent_channels: int = 4
    pretrained: Optional[str] = None  # an existing diffusers AutoencoderKL folder to start from
    decoder_only: bool = False  # fine-tune only the decoder (the latent space stays as it was)
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1e-6
    perceptual: str = "ssim"  # lpips (needs its weights on disk) | ssim (offline) | none
    perceptual_weight: float = 1.0
    disc_start: int = -1  # step at which the patch discriminator switches on; -1 = never (no GAN term)
    disc_weight: float = 0.5
    disc_layers: int = 3
    disc_learning_rate: Optional[float] = None  # default: learning_rate
    num_sample_images: int = 8
    scale_num_images: int = 512  # images encoded to estimate the latent scaling factor

    def validate(self) -> None:
        super().validate()
        for key in ("resolution", "num_sample_images", "scale_num_images"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.perceptual not in PERCEPTUAL_CHOICES:
            raise UserError(f"perceptual must be one of {', '.join(PERCEPTUAL_CHOICES)}, got '{self.perceptual}'")
        if self.decoder_only and not self.pretrained:
            raise UserError("decoder_only=true fine-tunes an existing autoencoder: also set pretrained=DIR")


class AutoencoderTrainingModule(nn.Module):
    """Runs encode -> sample -> decode inside `forward`, because DDP only syncs gradients of work done in forward."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        reconstructions = self.vae.decode(posterior.sample()).sample
        return reconstructions, posterior.mean, posterior.logvar


class AutoencoderTrainer(Trainer):
    """The autoencoder stage's hooks on the one loop (core/trainer.py)."""

    name = "autoencoder"

    def build_data(self) -> tuple[torch.utils.data.Dataset, Callable]:
        config = self.config
        train_ds = load_image_caption_dataset(config.data, config.train_split, config.image_column,
                                              config.caption_column)
        self.train_data = ImageCaptionDataset(train_ds, config.resolution, config.image_column, config.caption_column)
        held_out = held_out_indices(len(self.train_data), config.validation_fraction, config.seed)
        self.validation_rows = validation_rows(self.train_data, held_out, self.open_validation_split,
                                               config.validation_max_images, config.data)
        # reconstruction grids: held-out images where there are any
        first = range(min(config.num_sample_images, len(self.train_data)))
        rows = self.validation_rows or [r for r in (self.train_data[i] for i in first) if r is not None]
        self.sample_images = torch.stack([r["pixel_values"] for r in spread(rows, config.num_sample_images)])
        return without(self.train_data, held_out), self.collate

    def open_validation_split(self) -> ImageCaptionDataset:
        config = self.config
        held = load_image_caption_dataset(config.data, config.validation_split, config.image_column,
                                          config.caption_column)
        return ImageCaptionDataset(held, config.resolution, config.image_column, config.caption_column)

    def build_validation(self) -> list[dict]:
        rows, size = self.validation_rows, self.config.batch_size
        return [{"pixel_values": torch.stack([r["pixel_values"] for r in rows[i:i + size]]).to(self.accelerator.device)}
                for i in range(0, len(rows), size)]

    def validation_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Per image, the weighted L1 + L2 reconstruction error of the posterior mean (no sampling: deterministic)."""
        images = batch["pixel_values"]
        reconstructions = model.vae.decode(model.vae.encode(images).latent_dist.mean).sample
        error = (reconstructions.float() - images.float()).flatten(1)
        return self.config.l1_weight * error.abs().mean(1) + self.config.l2_weight * error.square().mean(1)

    def build_model(self) -> nn.Module:
        config = self.config
        if config.pretrained:
            vae = load_autoencoder(config.pretrained)
        else:
            vae = build_autoencoder(config.autoencoder_preset, config.resolution, config.latent_channels)
        if config.decoder_only:
            vae.encoder.requires_grad_(False)
            if vae.quant_conv is not None:
                vae.quant_conv.requires_grad_(False)
        self.perceptual = make_perceptual(config.perceptual)
        if self.perceptual is not None:
            self.perceptual.to(self.accelerator.device)
        logger.info("perceptual term: %s%s", config.perceptual,
                    " (offline choice: LPIPS weights cannot be downloaded here)" if config.perceptual == "ssim" else "")
        return AutoencoderTrainingModule(vae)

    def build_extras(self) -> None:
        config = self.config
        self.discriminator = None
        if config.disc_start >= 0:
            discriminator = PatchDiscriminator(layers=config.disc_layers)  # DDP broadcasts its BatchNorm buffers
            disc_optimizer = torch.optim.AdamW(discriminator.parameters(), betas=(config.adam_beta1, config.adam_beta2),
                                               weight_decay=0.0, lr=config.disc_learning_rate or config.learning_rate)
            self.discriminator, self.disc_optimizer = self.accelerator.prepare(discriminator, disc_optimizer)

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Reconstruction + KL + perceptual; with the GAN on, the adaptively weighted generator term."""
        config = self.config
        images = batch["pixel_values"]
        reconstructions, mean, logvar = self.model(images)
        perceptual = self.perceptual(images, reconstructions) if self.perceptual is not None else None
        losses = autoencoder_loss(images, reconstructions, mean, logvar, config.kl_weight, config.l1_weight,
                                  config.l2_weight, perceptual, config.perceptual_weight)
        self.reconstructions = reconstructions.detach()  # the discriminator's fakes in `after_optimizer_step`
        if self.gan_active:
            # the discriminator scores the reconstructions with frozen (detached) weights: only the decoder learns
            disc = self.accelerator.unwrap_model(self.discriminator)
            frozen = {name: t.detach() for name, t in [*disc.named_parameters(), *disc.named_buffers()]}
            gan = generator_gan_loss(functional_call(disc, frozen, (reconstructions,)))
            last_layer = self.accelerator.unwrap_model(self.model).vae.decoder.conv_out.weight
            gan_weight = adaptive_gan_weight(losses["nll"], gan, last_layer) * config.disc_weight
            losses.update(loss=losses["loss"] + gan_weight * gan, gan=gan.detach(), gan_weight=gan_weight)
        return losses

    @property
    def gan_active(self) -> bool:
        return self.discriminator is not None and self.step >= self.config.disc_start

    def after_optimizer_step(self, batch: dict, losses: dict[str, torch.Tensor]) -> None:
        """The discriminator's hinge step on real images vs this step's reconstructions (once the GAN is on)."""
        if not self.gan_active:
            return
        real = self.discriminator(batch["pixel_values"])
        fake = self.discriminator(self.reconstructions)
        disc_loss = hinge_discriminator_loss(real, fake)
        self.accelerator.backward(disc_loss)
        if all_ranks_true(self.accelerator, bool(torch.isfinite(disc_loss.detach()))):
            self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        losses["disc"] = disc_loss.detach()

    def inference_vae(self) -> nn.Module:
        """An eval-mode copy of the autoencoder with the EMA weights (or the raw weights without EMA)."""
        return self.inference_model().vae

    def make_samples(self) -> tuple[str, Image.Image]:
        """Originals (top row) above their reconstructions (posterior mean)."""
        vae = self.inference_vae()
        images = self.sample_images.to(self.accelerator.device)
        reconstructions = vae.decode(vae.encode(images).latent_dist.mode()).sample
        return "reconstructions", make_grid(tensor_to_pil(images) + tensor_to_pil(reconstructions),
                                            columns=len(images))

    def write_export(self, folder: Path) -> None:
        """The AutoencoderKL with its data-derived scaling factor (kept as is by a decoder-only fine-tune)."""
        vae = self.inference_vae()
        if self.config.decoder_only:  # the encoder, so the latent space and its scale, are unchanged
            scaling_factor, source = vae.config.scaling_factor, f"kept from {self.config.pretrained}"
        else:
            count = min(self.config.scale_num_images, len(self.train_data))
            rows = [r for r in (self.train_data[i] for i in range(count)) if r is not None]
            batches = [torch.stack([r["pixel_values"] for r in rows[i:i + 32]]) for i in range(0, len(rows), 32)]
            scaling_factor, source = estimate_scaling_factor(vae, batches), f"from {len(rows)} images"
        vae.register_to_config(scaling_factor=scaling_factor)
        vae.save_pretrained(folder, safe_serialization=True)
        logger.info("autoencoder scaling_factor %.4f %s", scaling_factor, source)


def run(config: AutoencoderTrainConfig) -> Path:
    """setup -> train -> export -> cleanup."""
    return AutoencoderTrainer(config).run()
