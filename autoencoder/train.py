"""Training recipe for the first stage: `accelerate launch train_autoencoder.py --config ... [key=value ...]`.

setup -> train (train_step, sample, checkpoint) -> export. The export in `output_dir/final` is a diffusers
AutoencoderKL folder whose config carries the latent scaling factor computed from the training data.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from autoencoder.discriminator import (PatchDiscriminator, adaptive_gan_weight, generator_gan_loss,
                                       hinge_discriminator_loss)
from autoencoder.losses import autoencoder_loss
from autoencoder.model import build_autoencoder, estimate_scaling_factor, load_autoencoder
from autoencoder.perceptual import PERCEPTUAL_CHOICES, make_perceptual
from ldm.config import save_config
from ldm.data.dataset import ImageCaptionDataset, SkippingCollate, load_image_caption_dataset
from ldm.errors import UserError
from ldm.files import atomic_folder
from ldm.images import make_grid, pil_to_uint8_array, tensor_to_pil
from ldm.training import (NonFiniteGuard, all_ranks_true, assert_replicas_in_sync, endless_batches, load_checkpoint,
                          make_accelerator, resolve_resume, save_checkpoint, setup_logging, step_is_finite)

logger = logging.getLogger(__name__)


@dataclass
class AutoencoderTrainConfig:
    """Every setting of an autoencoder run; saved as config.yaml beside each checkpoint and the export."""

    output_dir: str = ""
    data: str = ""
    image_column: str = "image"
    caption_column: str = "caption"
    train_split: str = "train"
    val_split: str = "validation"
    resolution: int = 64
    preset: str = "kl-f4"
    latent_channels: int = 4
    pretrained: Optional[str] = None  # an existing diffusers AutoencoderKL folder to start from
    decoder_only: bool = False  # fine-tune only the decoder (the latent space stays as it was)
    batch_size: int = 16
    learning_rate: float = 1e-4
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name, e.g. cosine (decays to 0 at max_steps)
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_steps: int = 10000
    seed: int = 0
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1e-6
    perceptual: str = "ssim"  # lpips (needs its weights on disk) | ssim (offline) | none
    perceptual_weight: float = 1.0
    disc_start: int = -1  # step at which the patch discriminator switches on; -1 = never (no GAN term)
    disc_weight: float = 0.5
    disc_layers: int = 3
    disc_learning_rate: Optional[float] = None  # default: learning_rate
    use_ema: bool = False
    ema_decay: float = 0.999
    resume: str = "auto"  # auto | never | PATH of a checkpoint
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 1000
    num_sample_images: int = 8
    scale_num_images: int = 512  # images encoded to estimate the latent scaling factor
    num_workers: int = 0
    max_nonfinite_steps: int = 10

    def validate(self) -> None:
        if not self.output_dir:
            raise UserError("output_dir is required: add output_dir=DIR")
        for key in ("resolution", "batch_size", "max_steps", "checkpoint_every", "log_every", "sample_every",
                    "num_sample_images", "scale_num_images", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}")
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


class AutoencoderTrainer:
    """The recipe. Read `setup`, then `train`; everything a step does is in `train_step`."""

    def __init__(self, config: AutoencoderTrainConfig) -> None:
        self.config = config

    def setup(self) -> None:
        config = self.config
        self.accelerator = make_accelerator(config.output_dir)
        setup_logging(self.accelerator)
        resume_from = resolve_resume(config.output_dir, config.resume)

        train_ds = load_image_caption_dataset(config.data, config.train_split, config.image_column,
                                              config.caption_column)
        self.train_data = ImageCaptionDataset(train_ds, config.resolution, config.image_column, config.caption_column)
        try:
            val_ds = load_image_caption_dataset(config.data, config.val_split, config.image_column,
                                                config.caption_column)
        except UserError:
            logger.warning("no '%s' split in %s: reconstruction grids use training images", config.val_split,
                           config.data)
            val_ds = train_ds
        val_data = ImageCaptionDataset(val_ds, config.resolution, config.image_column, config.caption_column)
        rows = [val_data[i] for i in range(min(config.num_sample_images, len(val_data)))]
        self.sample_images = torch.stack([r["pixel_values"] for r in rows if r is not None])

        set_seed(config.seed)  # the same initial weights on every rank
        if config.pretrained:
            self.vae = load_autoencoder(config.pretrained)
        else:
            self.vae = build_autoencoder(config.preset, config.resolution, config.latent_channels)
        if config.decoder_only:
            self.vae.encoder.requires_grad_(False)
            if self.vae.quant_conv is not None:
                self.vae.quant_conv.requires_grad_(False)
        trainable = [p for p in self.vae.parameters() if p.requires_grad]
        logger.info("autoencoder: %.2fM parameters, %.2fM trained", sum(p.numel() for p in self.vae.parameters())
                    / 1e6, sum(p.numel() for p in trainable) / 1e6)

        self.perceptual = make_perceptual(config.perceptual)
        if self.perceptual is not None:
            self.perceptual.to(self.accelerator.device)
        logger.info("perceptual term: %s%s", config.perceptual,
                    " (offline choice: LPIPS weights cannot be downloaded here)" if config.perceptual == "ssim" else "")

        self.collate = SkippingCollate()
        loader = torch.utils.data.DataLoader(
            self.train_data, batch_size=config.batch_size, shuffle=True, drop_last=True,
            num_workers=config.num_workers, collate_fn=self.collate,
            generator=torch.Generator().manual_seed(config.seed))
        betas = (config.adam_beta1, config.adam_beta2)
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=betas, weight_decay=0.0)
        # stepped by us once per optimiser step (a prepared scheduler would step once per process)
        self.lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                          num_training_steps=config.max_steps)
        self.accelerator.register_for_checkpointing(self.lr_scheduler)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(
            AutoencoderTrainingModule(self.vae), optimizer, loader)
        self.discriminator = None
        if config.disc_start >= 0:
            discriminator = PatchDiscriminator(layers=config.disc_layers)  # DDP broadcasts its BatchNorm buffers
            disc_optimizer = torch.optim.AdamW(discriminator.parameters(), betas=betas, weight_decay=0.0,
                                               lr=config.disc_learning_rate or config.learning_rate)
            self.discriminator, self.disc_optimizer = self.accelerator.prepare(discriminator, disc_optimizer)
        self.ema = None
        if config.use_ema:  # from the prepared (rank-0-broadcast) weights, so every rank's EMA is the same
            self.ema = EMAModel(self.vae.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=3 / 4)
            self.accelerator.register_for_checkpointing(self.ema)
        set_seed(config.seed, device_specific=True)  # each rank draws its own posterior samples

        self.step, self.batches_seen = 0, 0
        if resume_from is not None:
            state = load_checkpoint(self.accelerator, resume_from)
            self.step, self.batches_seen = state["step"], state["batches_seen"]
            logger.info("resumed from %s at step %d", resume_from, self.step)
        self.guard = NonFiniteGuard(config.max_nonfinite_steps)
        self.accelerator.init_trackers("autoencoder", config={k: v for k, v in dataclasses.asdict(config).items()
                                                              if isinstance(v, (int, float, str, bool))})

    def train_step(self, batch: dict) -> dict[str, float] | None:
        """One autoencoder step (and, once `disc_start` is reached, one discriminator step) on one batch.

        Returns the logged numbers, or None if a non-finite loss on any rank made every rank skip the step.
        """
        config = self.config
        images = batch["pixel_values"]
        reconstructions, mean, logvar = self.model(images)
        perceptual = self.perceptual(images, reconstructions) if self.perceptual is not None else None
        losses = autoencoder_loss(images, reconstructions, mean, logvar, config.kl_weight, config.l1_weight,
                                  config.l2_weight, perceptual, config.perceptual_weight)
        loss = losses["loss"]
        gan_active = self.discriminator is not None and self.step >= config.disc_start
        if gan_active:
            # the discriminator scores the reconstructions with frozen (detached) weights: only the decoder learns
            disc = self.accelerator.unwrap_model(self.discriminator)
            frozen = {name: t.detach() for name, t in [*disc.named_parameters(), *disc.named_buffers()]}
            gan = generator_gan_loss(functional_call(disc, frozen, (reconstructions,)))
            last_layer = self.accelerator.unwrap_model(self.model).vae.decoder.conv_out.weight
            gan_weight = adaptive_gan_weight(losses["nll"], gan, last_layer) * config.disc_weight
            loss = loss + gan_weight * gan
            losses.update(loss=loss, gan=gan.detach(), gan_weight=gan_weight)
        self.accelerator.backward(loss)
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
        finite = step_is_finite(self.accelerator, grad_norm, loss)
        if self.guard.check(finite, self.step):
            self.optimizer.step()
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.step(self.vae.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            return None
        if gan_active:
            real = self.discriminator(images)
            fake = self.discriminator(reconstructions.detach())
            disc_loss = hinge_discriminator_loss(real, fake)
            self.accelerator.backward(disc_loss)
            if all_ranks_true(self.accelerator, bool(torch.isfinite(disc_loss.detach()))):
                self.disc_optimizer.step()
            self.disc_optimizer.zero_grad(set_to_none=True)
            losses["disc"] = disc_loss.detach()
        logged = self.accelerator.gather({k: v.detach().float().reshape(1) for k, v in losses.items()})
        return {k: v.mean().item() for k, v in logged.items()}

    def train(self) -> None:
        config = self.config
        batches = endless_batches(self.accelerator, self.loader, self.batches_seen)
        progress = tqdm(total=config.max_steps, initial=self.step, desc="autoencoder", unit="step",
                        disable=not self.accelerator.is_main_process)
        last_time, last_step, skipped_warned = time.perf_counter(), self.step, 0
        while self.step < config.max_steps:
            batch = next(batches)
            self.batches_seen += 1
            if not all_ranks_true(self.accelerator, batch is not None):
                continue
            logs = self.train_step(batch)
            if logs is None:
                continue
            self.step += 1
            progress.update(1)
            if self.collate.skipped > skipped_warned:
                logger.warning("skipped %d undecodable images so far", self.collate.skipped)
                skipped_warned = self.collate.skipped
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                now = time.perf_counter()
                images_per_second = (self.step - last_step) * config.batch_size * self.accelerator.num_processes \
                    / max(now - last_time, 1e-9)
                last_time, last_step = now, self.step
                self.accelerator.log({**{f"train/{k}": v for k, v in logs.items()},
                                      "train/lr": self.lr_scheduler.get_last_lr()[0],
                                      "train/images_per_second": images_per_second}, step=self.step)
                progress.set_postfix(loss=f"{logs['loss']:.4g}", l1=f"{logs['l1_pixel']:.4f}",
                                     img_s=f"{images_per_second:.1f}", **({"disc": f"{logs['disc']:.3f}"}
                                                                         if "disc" in logs else {}))
            if self.step % config.sample_every == 0 or self.step == config.max_steps:
                self.save_samples()
            if self.step % config.checkpoint_every == 0 or self.step == config.max_steps:
                self.save_checkpoint()
        progress.close()

    def inference_vae(self) -> nn.Module:
        """An eval-mode copy of the autoencoder with the EMA weights (or the raw weights without EMA)."""
        vae = copy.deepcopy(self.vae).eval()
        if self.ema is not None:
            self.ema.copy_to(vae.parameters())
        return vae

    @torch.no_grad()
    def save_samples(self) -> None:
        """Originals (top row) above their reconstructions (posterior mean), as PNG and in TensorBoard."""
        if not self.accelerator.is_main_process:
            return
        vae = self.inference_vae()
        images = self.sample_images.to(self.accelerator.device)
        reconstructions = vae.decode(vae.encode(images).latent_dist.mode()).sample
        grid = make_grid(tensor_to_pil(images) + tensor_to_pil(reconstructions), columns=len(images))
        folder = Path(self.config.output_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step-{self.step:08d}.png")
        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("reconstructions", pil_to_uint8_array(grid), self.step, dataformats="HWC")

    def save_checkpoint(self) -> None:
        path = save_checkpoint(self.accelerator, self.config.output_dir, self.step, self.config,
                               {"batches_seen": self.batches_seen, "skipped_images": self.collate.skipped},
                               self.config.keep_checkpoints)
        logger.info("saved checkpoint %s", path)

    @torch.no_grad()
    def export(self) -> Path:
        """Write `output_dir/final`: the AutoencoderKL with its data-derived scaling factor, plus config.yaml."""
        final = Path(self.config.output_dir) / "final"
        assert_replicas_in_sync(self.accelerator, self.vae.parameters(), "autoencoder weights")
        if self.ema is not None:
            assert_replicas_in_sync(self.accelerator, self.ema.shadow_params, "EMA weights")
        if self.accelerator.is_main_process:
            vae = self.inference_vae()
            if self.config.decoder_only:  # the encoder, so the latent space and its scale, are unchanged
                scaling_factor, source = vae.config.scaling_factor, f"kept from {self.config.pretrained}"
            else:
                count = min(self.config.scale_num_images, len(self.train_data))
                rows = [r for r in (self.train_data[i] for i in range(count)) if r is not None]
                batches = [torch.stack([r["pixel_values"] for r in rows[i:i + 32]]) for i in range(0, len(rows), 32)]
                scaling_factor, source = estimate_scaling_factor(vae, batches), f"from {len(rows)} images"
            vae.register_to_config(scaling_factor=scaling_factor)
            with atomic_folder(final) as tmp:
                vae.save_pretrained(tmp, safe_serialization=True)
                save_config(self.config, tmp / "config.yaml")
            logger.info("exported autoencoder to %s (scaling_factor %.4f %s)", final, scaling_factor, source)
        self.accelerator.wait_for_everyone()
        return final

    def cleanup(self) -> None:
        self.accelerator.end_training()


def run(config: AutoencoderTrainConfig) -> Path:
    """setup -> train -> export -> cleanup."""
    trainer = AutoencoderTrainer(config)
    trainer.setup()
    trainer.train()
    final = trainer.export()
    trainer.cleanup()
    return final
