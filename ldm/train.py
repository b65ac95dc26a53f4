"""Training recipe for the latent U-Net: `accelerate launch train_ldm.py --config ... [key=value ...]`.

L_simple (DDPM eq. 14) on scaled latents of a frozen autoencoder, conditioned on a frozen text encoder, with
condition dropout (the caption replaced by "" with probability `cond_drop_prob`) so sampling can use classifier-free
guidance. setup -> train (train_step, sample, checkpoint) -> export -> cleanup.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from autoencoder.model import downsampling_factor, load_autoencoder
from ldm.cache import load_or_build_cache
from ldm.config import save_config
from ldm.data.dataset import (ImageCaptionDataset, SkippingCollate, check_caption_templates,
                              load_image_caption_dataset)
from ldm.diffusion import BETA_SCHEDULES, NoiseSchedule, diffusion_loss, sample_noise, sample_timesteps
from ldm.errors import UserError
from ldm.images import make_grid, pil_to_uint8_array
from ldm.text_encoders import DEFAULT_TEXT_ENCODER, load_text_encoder
from ldm.training import (NonFiniteGuard, all_ranks_true, assert_replicas_in_sync, endless_batches, load_checkpoint,
                          make_accelerator, resolve_resume, save_checkpoint, setup_logging, step_is_finite)
from ldm.unet import build_unet, enable_xformers

logger = logging.getLogger(__name__)


@dataclass
class LDMTrainConfig:
    """Every setting of a latent diffusion run; saved as config.yaml beside each checkpoint and the export."""

    output_dir: str = ""
    data: str = ""
    image_column: str = "image"
    caption_column: str = "caption"
    # caption variants, one drawn per image and step; fields: caption, article ("a"/"an"), any text column
    caption_templates: list[str] = field(default_factory=lambda: ["{caption}"])
    train_split: str = "train"
    autoencoder: str = ""  # output_dir (or final/) of train_autoencoder.py, or any diffusers AutoencoderKL folder
    text_encoder: str = DEFAULT_TEXT_ENCODER
    text_max_length: int = 77
    resolution: Optional[int] = None  # pixels; defaults to the autoencoder's sample_size
    unet_preset: str = "emoji-s"
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    min_snr_gamma: Optional[float] = None  # None = uniform L_simple
    offset_noise: float = 0.0
    cond_drop_prob: float = 0.1
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    use_ema: bool = True
    ema_decay: float = 0.999
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa (PyTorch scaled_dot_product_attention) | xformers (GPU, if installed)
    compile: bool = False  # torch.compile the U-Net
    cache_latents: bool = True  # encode the data once with the frozen stages (ldm/cache.py)
    cache_dir: Optional[str] = None  # default: output_dir/cache
    ddp_timeout_minutes: int = 10  # a rank that stops answering fails the others after this long
    max_steps: int = 10000
    seed: int = 0
    resume: str = "auto"  # auto | never | PATH of a checkpoint
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 1000
    sample_prompts: list[str] = field(default_factory=lambda: ["a cat", "red apple", "rocket", "smiling face"])
    sample_steps: int = 25
    sample_guidance_scale: float = 4.0
    sample_seed: int = 0
    num_workers: int = 0
    max_nonfinite_steps: int = 10

    def validate(self) -> None:
        if not self.output_dir:
            raise UserError("output_dir is required: add output_dir=DIR")
        if not self.autoencoder:
            raise UserError("autoencoder is required: add autoencoder=DIR (the output_dir of train_autoencoder.py)")
        for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "checkpoint_every", "log_every",
                    "sample_every", "sample_steps", "max_nonfinite_steps", "text_max_length", "num_train_timesteps"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.cond_drop_prob < 1:
            raise UserError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise UserError(f"unknown beta_schedule '{self.beta_schedule}'; valid: {', '.join(BETA_SCHEDULES)}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.attention not in ("sdpa", "xformers"):
            raise UserError(f"attention must be sdpa or xformers, got '{self.attention}'")

    def noise_schedule(self) -> NoiseSchedule:
        try:
            return NoiseSchedule(self.num_train_timesteps, self.beta_schedule, self.beta_start, self.beta_end,
                                 self.prediction_type, self.zero_terminal_snr)
        except ValueError as err:
            raise UserError(str(err)) from err


class LDMTrainer:
    """The recipe. Read `setup`, then `train`; everything one optimiser step does is in `train_step`."""

    def __init__(self, config: LDMTrainConfig) -> None:
        self.config = config

    def setup(self) -> None:
        config = self.config
        self.accelerator = make_accelerator(config.output_dir, config.gradient_accumulation_steps,
                                            config.ddp_timeout_minutes)
        setup_logging(self.accelerator)
        resume_from = resolve_resume(config.output_dir, config.resume)
        device = self.accelerator.device

        # frozen stages: eval mode, no gradients, outside the optimiser and the training state
        self.vae = load_autoencoder(config.autoencoder).to(device).eval().requires_grad_(False)
        self.text_encoder = load_text_encoder(config.text_encoder, config.text_max_length).to(device)
        self.schedule = config.noise_schedule()
        factor = downsampling_factor(self.vae)
        self.resolution = config.resolution or self.vae.config.sample_size
        if self.resolution % factor:
            raise UserError(f"resolution {self.resolution} is not a multiple of the autoencoder's factor {factor}")
        logger.info("autoencoder %s: f=%d, scaling_factor %.4f; text encoder %s (dim %d)", config.autoencoder, factor,
                    self.vae.config.scaling_factor, config.text_encoder, self.text_encoder.hidden_size)

        train_ds = load_image_caption_dataset(config.data, config.train_split, config.image_column,
                                              config.caption_column)
        check_caption_templates(train_ds, config.caption_column, tuple(config.caption_templates))
        train_data = ImageCaptionDataset(train_ds, self.resolution, config.image_column, config.caption_column,
                                         tuple(config.caption_templates))
        self.collate = SkippingCollate()
        self.cache = None
        if config.cache_latents:
            self.cache = load_or_build_cache(self.accelerator, train_data, self.vae, self.text_encoder,
                                             config.cache_dir or Path(config.output_dir) / "cache")
        loader = torch.utils.data.DataLoader(
            self.cache if self.cache is not None else train_data, batch_size=config.batch_size, shuffle=True,
            drop_last=True, num_workers=config.num_workers,
            collate_fn=torch.utils.data.default_collate if self.cache is not None else self.collate,
            generator=torch.Generator().manual_seed(config.seed))

        set_seed(config.seed)  # the same initial weights on every rank, whatever ran before
        unet = build_unet(config.unet_preset, self.resolution // factor, self.vae.config.latent_channels,
                          self.text_encoder.hidden_size)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if config.attention == "xformers":
            enable_xformers(unet)
        logger.info("U-Net %s: %.2fM parameters", config.unet_preset, sum(p.numel() for p in unet.parameters()) / 1e6)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                      betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
        # stepped by us once per optimiser step (a prepared scheduler would step once per process)
        self.lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                          num_training_steps=config.max_steps)
        self.accelerator.register_for_checkpointing(self.lr_scheduler)
        self.unet, self.optimizer, self.loader = self.accelerator.prepare(unet, optimizer, loader)
        self.ema = None
        if config.use_ema:  # EMA of every rank starts from the same (prepared, rank-0-broadcast) weights
            self.ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=3 / 4)
            self.ema.to(device)
            self.accelerator.register_for_checkpointing(self.ema)
        self.unet_forward = torch.compile(self.unet) if config.compile else self.unet
        set_seed(config.seed, device_specific=True)  # each rank draws its own noise, timesteps and dropout

        self.step, self.batches_seen = 0, 0
        if resume_from is not None:
            state = load_checkpoint(self.accelerator, resume_from)
            self.step, self.batches_seen = state["step"], state["batches_seen"]
            logger.info("resumed from %s at step %d", resume_from, self.step)
        self.guard = NonFiniteGuard(config.max_nonfinite_steps)
        self.accelerator.init_trackers("ldm", config={k: v for k, v in dataclasses.asdict(config).items()
                                                      if isinstance(v, (int, float, str, bool))})

    def draw_captions(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: whether its caption is dropped (condition dropout) and which caption variant it gets."""
        drop = torch.rand(batch_size) < self.config.cond_drop_prob
        variant = torch.randint(0, len(self.config.caption_templates), (batch_size,))
        return drop, variant

    @torch.no_grad()
    def encode_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents (a fresh posterior sample) and text hidden states with condition dropout applied.

        Cached and uncached batches draw the same random numbers in the same order, so both give the same loss.
        """
        device = self.accelerator.device
        if self.cache is None:
            images = batch["pixel_values"].to(device)
            latents = self.vae.encode(images).latent_dist.sample() * self.vae.config.scaling_factor
            drop, variant = self.draw_captions(len(batch["captions"]))
            captions = ["" if dropped else variants[j]
                        for variants, dropped, j in zip(batch["captions"], drop.tolist(), variant.tolist())]
            return latents, self.text_encoder.encode(captions).hidden_states
        mean, logvar = batch["latent_mean"].to(device), batch["latent_logvar"].to(device)
        sample = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=device, dtype=mean.dtype)
        drop, variant = self.draw_captions(len(mean))
        context = self.cache.caption_embeddings[batch["caption_ids"][torch.arange(len(mean)), variant]]
        context[drop] = self.cache.empty_embedding
        return sample * self.vae.config.scaling_factor, context.to(device)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """L_simple (or its weighted variants) for one batch: noise the latents at random t, predict, compare."""
        latents, context = self.encode_batch(batch)
        noise = sample_noise(latents, self.config.offset_noise)
        timesteps = sample_timesteps(latents.shape[0], self.schedule.num_train_timesteps, latents.device)
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        prediction = self.unet_forward(noisy, timesteps, encoder_hidden_states=context).sample
        return diffusion_loss(prediction, self.schedule.target(latents, noise, timesteps),
                              self.schedule.loss_weights(timesteps, self.config.min_snr_gamma))

    def train_step(self, batch: dict) -> tuple[bool, torch.Tensor]:
        """Forward + backward on one batch; at the end of an accumulation cycle, one optimiser step.

        Returns (optimiser stepped, loss). A non-finite gradient norm (identical on every rank after DDP's
        all-reduce) skips the step on every rank.
        """
        with self.accelerator.accumulate(self.unet):
            loss = self.compute_loss(batch)
            self.accelerator.backward(loss)
            if not self.accelerator.sync_gradients:
                return False, loss.detach()
            grad_norm = self.accelerator.clip_grad_norm_(self.unet.parameters(), self.config.max_grad_norm)
            stepped = self.guard.check(step_is_finite(self.accelerator, grad_norm, loss), self.step)
            if stepped:
                self.optimizer.step()
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if stepped and self.ema is not None:
            self.ema.step(self.unet.parameters())
        return stepped, loss.detach()

    def train(self) -> None:
        config = self.config
        batches = endless_batches(self.accelerator, self.loader, self.batches_seen)
        progress = tqdm(total=config.max_steps, initial=self.step, desc="ldm", unit="step",
                        disable=not self.accelerator.is_main_process)
        images_per_step = config.batch_size * config.gradient_accumulation_steps * self.accelerator.num_processes
        last_time, last_step, skipped_warned = time.perf_counter(), self.step, 0
        while self.step < config.max_steps:
            batch = next(batches)
            self.batches_seen += 1
            if not all_ranks_true(self.accelerator, batch is not None):
                continue
            stepped, loss = self.train_step(batch)
            if not stepped:
                continue
            self.step += 1
            progress.update(1)
            if self.collate.skipped > skipped_warned:
                logger.warning("skipped %d undecodable images so far", self.collate.skipped)
                skipped_warned = self.collate.skipped
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                now = time.perf_counter()
                images_per_second = (self.step - last_step) * images_per_step / max(now - last_time, 1e-9)
                last_time, last_step = now, self.step
                mean_loss = self.accelerator.gather(loss.reshape(1)).mean().item()
                self.accelerator.log({"train/loss": mean_loss, "train/lr": self.lr_scheduler.get_last_lr()[0],
                                      "train/images_per_second": images_per_second}, step=self.step)
                progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images_per_second:.1f}")
            if self.step % config.sample_every == 0 or self.step == config.max_steps:
                self.save_samples()
            if self.step % config.checkpoint_every == 0 or self.step == config.max_steps:
                self.save_checkpoint()
        progress.close()

    def inference_unet(self):
        """A copy of the U-Net holding the EMA weights (or the raw weights without EMA), for sampling and export."""
        unet = copy.deepcopy(self.accelerator.unwrap_model(self.unet)).eval()
        if self.ema is not None:
            self.ema.copy_to(unet.parameters())
        return unet

    def inference_pipeline(self):
        from pipelines import Pipeline

        return Pipeline(vae=self.vae, text_encoder=self.text_encoder, unet=self.inference_unet(),
                        scheduler=DDPMScheduler(**self.schedule.to_scheduler_config()))

    def save_samples(self) -> None:
        """Fixed prompts and seed, EMA weights: one grid per sampling step, as PNG and in TensorBoard."""
        if not self.accelerator.is_main_process:
            return
        images = self.inference_pipeline().generate(
            self.config.sample_prompts, num_inference_steps=self.config.sample_steps,
            guidance_scale=self.config.sample_guidance_scale, seed=self.config.sample_seed, progress=False)
        grid = make_grid(images, columns=len(images))
        folder = Path(self.config.output_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step-{self.step:08d}.png")
        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("samples", pil_to_uint8_array(grid), self.step, dataformats="HWC")

    def save_checkpoint(self) -> None:
        path = save_checkpoint(self.accelerator, self.config.output_dir, self.step, self.config,
                               {"batches_seen": self.batches_seen, "skipped_images": self.collate.skipped,
                                "nonfinite_steps": self.guard.total}, self.config.keep_checkpoints)
        logger.info("saved checkpoint %s", path)

    def export(self) -> Path:
        """`output_dir/final`: diffusers StableDiffusionPipeline layout with the EMA U-Net, plus config.yaml."""
        final = Path(self.config.output_dir) / "final"
        assert_replicas_in_sync(self.accelerator, self.unet.parameters(), "U-Net weights")
        if self.ema is not None:
            assert_replicas_in_sync(self.accelerator, self.ema.shadow_params, "EMA weights")
        if self.accelerator.is_main_process:
            self.inference_pipeline().save_pretrained(final)
            save_config(self.config, final / "config.yaml")
            logger.info("exported model to %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def cleanup(self) -> None:
        self.accelerator.end_training()


def run(config: LDMTrainConfig) -> Path:
    """setup -> train -> export -> cleanup."""
    trainer = LDMTrainer(config)
    trainer.setup()
    trainer.train()
    final = trainer.export()
    trainer.cleanup()
    return final
