"""Training recipe for the noise-aware classifier of classifier guidance:
`accelerate launch train_classifier.py --config configs/classifier/<preset>.yaml [key=value ...]`.

Cross-entropy of a label column (emoji category, style) on latents of the frozen autoencoder, noised at uniform
random timesteps with the latent diffusion model's noise schedule (Dhariwal & Nichol 2021, section 4). The loop is
core/trainer.py; this file says what the stage builds, its loss, its samples and its export.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from autoencoder.model import downsampling_factor, load_autoencoder
from core.data.dataset import ImageCaptionDataset, load_image_caption_dataset
from core.data.validation import held_out_indices, validation_rows, without
from core.errors import UserError
from core.images import captioned_grid
from core.trainer import TrainConfig, Trainer
from ldm.classifier import PRESETS, NoisyLatentClassifier, latent_probe
from ldm.diffusion import BETA_SCHEDULES, NoiseSchedule, sample_timesteps

logger = logging.getLogger(__name__)


@dataclass
class ClassifierTrainConfig(TrainConfig):
    """Every setting of a classifier run; saved as config.yaml beside each checkpoint and the export."""

    autoencoder: str = ""  # the latent diffusion model's autoencoder (a train_autoencoder.py output or model folder)
    label_column: str = "category"  # the dataset column whose values are the classes
    resolution: Optional[int] = None  # pixels; defaults to the autoencoder's sample_size
    classifier_preset: str = "emoji-s"
    batch_size: int = 64
    learning_rate: float = 3e-4
    weight_decay: float = 0.05
    use_ema: bool = False
    # the noise schedule: the latent diffusion model's (defaults: NoiseSchedule's, ldm/diffusion.py)
    num_train_timesteps: int = NoiseSchedule.num_train_timesteps
    beta_schedule: str = NoiseSchedule.beta_schedule
    beta_start: float = NoiseSchedule.beta_start
    beta_end: float = NoiseSchedule.beta_end
    num_sample_images: int = 8

    def validate(self) -> None:
        super().validate()
        if not self.autoencoder:
            raise UserError("autoencoder is required: add autoencoder=DIR (the latent diffusion model's)")
        if self.classifier_preset not in PRESETS:
            raise UserError(f"unknown classifier_preset '{self.classifier_preset}'; valid: {', '.join(PRESETS)}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise UserError(f"unknown beta_schedule '{self.beta_schedule}'; valid: {', '.join(BETA_SCHEDULES)}")

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.num_train_timesteps, self.beta_schedule, self.beta_start, self.beta_end)


class ClassifierTrainer(Trainer):
    """The classifier's hooks on the one loop (core/trainer.py)."""

    name = "classifier"

    def build_data(self) -> tuple[torch.utils.data.Dataset, Callable]:
        config = self.config
        ds = load_image_caption_dataset(config.data, config.train_split, config.image_column, config.caption_column)
        if config.label_column not in ds.column_names:
            raise UserError(f"dataset {config.data} has no column '{config.label_column}' (set label_column=...); "
                            f"its columns: {', '.join(ds.column_names)}")
        self.labels = sorted(set(ds[config.label_column]))
        position = {label: i for i, label in enumerate(self.labels)}
        self.label_ids = torch.tensor([position[v] for v in ds[config.label_column]])
        self.vae = load_autoencoder(config.autoencoder).to(self.accelerator.device).eval().requires_grad_(False)
        self.resolution = config.resolution or self.vae.config.sample_size
        self.schedule = config.noise_schedule()
        data = ImageCaptionDataset(ds, self.resolution, config.image_column, config.caption_column)
        rows = (data[i] for i in range(min(config.num_sample_images, len(data))))
        self.sample_rows = [r for r in rows if r is not None]
        logger.info("%d classes from column '%s'", len(self.labels), config.label_column)
        held_out = held_out_indices(len(data), config.validation_fraction, config.seed)
        rows = validation_rows(data, held_out, self.open_validation_split, config.validation_max_images, config.data)
        # rows of the held-out split carry their label in "label"; held-out training rows are looked up by index
        self.validation_rows = [(r, r["label"] if "label" in r else self.label_ids[r["index"]]) for r in rows
                                if r.get("label", 0) is not None]
        return without(data, held_out), self.collate

    def open_validation_split(self) -> list[dict | None]:
        """The held-out split's rows with their label id (None for a label training never saw: left out)."""
        config = self.config
        held = load_image_caption_dataset(config.data, config.validation_split, config.image_column,
                                          config.caption_column)
        position = {label: i for i, label in enumerate(self.labels)}
        data = ImageCaptionDataset(held, self.resolution, config.image_column, config.caption_column)
        labels = [position.get(v) for v in held[config.label_column]] if config.label_column in held.column_names \
            else [None] * len(held)
        return _Labelled(data, labels)

    def build_validation(self) -> list[dict]:
        rows, size, device = self.validation_rows, self.config.batch_size, self.accelerator.device
        batches = []
        for i in range(0, len(rows), size):
            pixels = torch.stack([r["pixel_values"] for r, _ in rows[i:i + size]]).to(device)
            latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
            batches.append({"latents": latents, "labels": torch.tensor([int(y) for _, y in rows[i:i + size]],
                                                                       device=device)})
        return batches

    def validation_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Per image, the cross-entropy averaged over a fixed grid of 8 timesteps (noise from the seeded RNG)."""
        latents, k = batch["latents"], 8
        steps = ((torch.arange(k) + 0.5) * self.schedule.num_train_timesteps / k).long().to(latents.device)
        repeated = latents.repeat_interleave(k, 0)
        timesteps = steps.repeat(len(latents))
        noisy = self.schedule.add_noise(repeated, torch.randn(repeated.shape, device=latents.device), timesteps)
        losses = F.cross_entropy(model(noisy, timesteps), batch["labels"].repeat_interleave(k), reduction="none")
        return losses.reshape(len(latents), k).mean(1)

    def build_model(self) -> nn.Module:
        schedule = {k: v for k, v in self.schedule.to_scheduler_config().items()
                    if k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")}
        return NoisyLatentClassifier(
            labels=tuple(self.labels), label_column=self.config.label_column,
            latent_channels=self.vae.config.latent_channels,
            latent_size=self.resolution // downsampling_factor(self.vae),
            block_out_channels=PRESETS[self.config.classifier_preset],
            latent_probe=tuple(latent_probe(self.vae, self.resolution)), noise_schedule=schedule)

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Cross-entropy of the label on the latents noised at a uniform random timestep."""
        device = self.accelerator.device
        with torch.no_grad():
            latents = self.vae.encode(batch["pixel_values"].to(device)).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
        timesteps = sample_timesteps(len(latents), self.schedule.num_train_timesteps, device)
        noisy = self.schedule.add_noise(latents, torch.randn(latents.shape, device=device), timesteps)
        logits = self.model(noisy, timesteps)
        labels = self.label_ids[batch["indices"]].to(device)
        return {"loss": F.cross_entropy(logits, labels),
                "accuracy": (logits.argmax(-1) == labels).float().mean().detach()}

    @torch.no_grad()
    def make_samples(self) -> tuple[str, Image.Image]:
        """The first training images with their label and the prediction at t = 0 and t = 500."""
        model = self.inference_model()
        pixels = torch.stack([r["pixel_values"] for r in self.sample_rows]).to(self.accelerator.device)
        latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        captions = []
        noisy = self.schedule.add_noise(latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(
            0)).to(latents.device), torch.full((len(latents),), 500, device=latents.device))
        clean_pred = model(latents, torch.zeros(len(latents), dtype=torch.long, device=latents.device)).argmax(-1)
        noisy_pred = model(noisy, torch.full((len(latents),), 500, device=latents.device)).argmax(-1)
        for row, a, b in zip(self.sample_rows, clean_pred.tolist(), noisy_pred.tolist()):
            truth = self.labels[int(self.label_ids[row["index"]])]
            captions.append(f"{truth[:12]}\n{self.labels[a][:12]} / {self.labels[b][:12]}")
        return "classifier", captioned_grid(pixels, captions, columns=len(captions))

    def write_export(self, folder: Path) -> None:
        """The classifier in diffusers' ModelMixin layout (config.json with labels, latent probe and schedule)."""
        self.inference_model().save_pretrained(folder, safe_serialization=True)


class _Labelled:
    """Rows of a held-out split with their label id added (None where the image or the label is unusable)."""

    def __init__(self, data: ImageCaptionDataset, labels: list[int | None]) -> None:
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict | None:
        row = self.data[i]
        return None if row is None else {**row, "label": self.labels[i]}


def run(config: ClassifierTrainConfig) -> Path:
    """setup -> train -> export -> cleanup."""
    return ClassifierTrainer(config).run()
