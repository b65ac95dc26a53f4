"""Training recipe for the latent U-Net: `accelerate launch train_ldm.py --config ... [key=value ...]`.

L_simple (DDPM eq. 14) on scaled latents of a frozen autoencoder, conditioned on a frozen text encoder, with
condition dropout (the caption replaced by "" with probability `cond_drop_prob`) so sampling can use classifier-free
guidance. The loop is core/trainer.py; this file says what the stage builds, its loss, its samples and its export.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from torch import nn

from autoencoder.model import downsampling_factor, load_autoencoder
from core.data.batches import BucketBatchSampler
from core.data.buckets import Bucketer
from core.data.dataset import ImageCaptionDataset, check_caption_templates, load_image_caption_dataset
from core.data.sources import is_tar_pattern, open_source
from core.data.validation import held_out_indices, validation_rows, without
from core.errors import UserError
from core.images import make_grid
from core.trainer import TrainConfig, Trainer
from ldm.cache import DTYPES, CacheInputs, CachedLatents, load_or_build_cache
from ldm.diffusion import (BETA_SCHEDULES, TIMESTEP_DENSITIES, NoiseSchedule, diffusion_loss, sample_noise,
                           sample_timesteps, vlb_term)
from ldm.lora import DEFAULT_TARGETS, add_lora, base_fingerprint, check_lora_settings, write_adapter
from ldm.text_encoders import load_text_encoder
from ldm.unet import PRESETS, build_unet, enable_xformers, size_multiple
from pipelines import Pipeline
from recipes.inherit import check_same_latent_space, fill_scratch_defaults, inherit_settings
from recipes.dreambooth import (DreamBoothDataset, class_images, dreambooth_collate, image_files, load_image,
                                model_fingerprint, prior_weights, without_instance_images)
from pipelines.defaults import DEFAULT_SCHEDULER
from pipelines.loading import (base_model_name, check_model_folder, read_model_index, resolve_model_path,
                               write_model_folder)
from pipelines.schedulers import SCHEDULERS

logger = logging.getLogger(__name__)


@dataclass
class LDMTrainConfig(TrainConfig):
    """Every setting of a latent diffusion run; saved as config.yaml beside each checkpoint and the export."""

    renamed: ClassVar[dict[str, str]] = {"sample_steps": "sample_num_inference_steps"}  # old spellings still read

    # caption variants, one drawn per image and step; fields: caption, article ("a"/"an"), any text column
    caption_templates: list[str] = field(default_factory=lambda: ["{caption}"])
    # start the U-Net from a text-to-image model's weights (train_ldm.py's final/ or an `ldm export` folder; its
    # optimiser state is not kept): a fine-tune on new data, or a run continued elsewhere. unet_preset is then unused
    init_from: str = ""
    # LoRA (ldm/lora.py, docs/adapters.md): train a low-rank adapter on init_from's frozen U-Net instead of every
    # weight; checkpoints hold the adapter, final/ is diffusers' pytorch_lora_weights.safetensors + adapter.json
    lora: bool = False
    lora_rank: int = 4
    lora_alpha: Optional[float] = None  # default: lora_rank (scale 1)
    # module names (or their last parts); attention projections by default, add e.g. conv1, conv2 for convolutions
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lora_dropout: float = 0.0
    # DreamBooth (recipes/dreambooth.py, docs/adapters.md): a folder of a few images of one subject, all captioned
    # instance_prompt, which must contain identifier (a rare word naming the subject); LoRA or full, from init_from
    instance_data: str = ""
    instance_prompt: str = ""
    identifier: str = ""
    # prior preservation: num_class_images drawn once by the base model from these prompts (cycled), trained beside
    # the instance images with weight prior_loss_weight; [] = off
    class_prompts: list[str] = field(default_factory=list)
    num_class_images: int = 100
    class_data_dir: Optional[str] = None  # default output_dir/class_images
    prior_loss_weight: float = 1.0
    inpainting: bool = False  # true: the inpainting fine-tune (recipes/inpainting.py; train_ldm.py dispatches on it)
    distill: bool = False  # true: consistency distillation of init_from (recipes/consistency.py)
    controlnet: bool = False  # true: a ControlNet trained on init_from's frozen U-Net (recipes/controlnet.py)
    autoencoder: str = ""  # output_dir (or final/) of train_autoencoder.py, or any diffusers AutoencoderKL folder;
    # default with init_from: its vae/ (another one must encode identically: same encoder and scaling factor)
    # What a model folder fixes (recipes/inherit.py): unset (empty / null) = init_from's, or SCRATCH_DEFAULTS from
    # scratch; a fine-tune that sets one differently from its base is refused (it would train off its distribution)
    text_encoder: str = ""  # minilm | a local folder | openclip:... (ldm/text_encoders.py)
    text_max_length: Optional[int] = None  # the padding length of every caption (77 from scratch)
    resolution: Optional[int] = None  # pixels; defaults to the autoencoder's sample_size
    unet_preset: str = "emoji-s"
    # the noise schedule (ldm/diffusion.py's NoiseSchedule, whose defaults apply from scratch)
    num_train_timesteps: Optional[int] = None
    beta_schedule: Optional[str] = None
    beta_start: Optional[float] = None
    beta_end: Optional[float] = None
    prediction_type: Optional[str] = None
    zero_terminal_snr: Optional[bool] = None
    # also learn the reverse variance: L_simple + vlb_weight * L_vlb (improved DDPM)
    learned_variance: Optional[bool] = None
    vlb_weight: float = 0.001  # lambda of the hybrid objective; the bound's gradient reaches only the variance
    min_snr_gamma: Optional[float] = None  # None = uniform L_simple
    # where training timesteps fall (ldm/diffusion.py sample_timesteps): uniform | logit_normal | cosmap
    timestep_density: str = "uniform"
    timestep_logit_mean: float = 0.0  # logit_normal's location (SD3: 0) and scale (SD3: 1)
    timestep_logit_std: float = 1.0
    offset_noise: float = 0.0
    cond_drop_prob: float = 0.1
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa (PyTorch scaled_dot_product_attention) | xformers (GPU, if installed)
    compile: bool = False  # torch.compile the U-Net
    cache_latents: bool = True  # encode the data once with the frozen stages (ldm/cache.py); tar shards need it
    cache_dir: Optional[str] = None  # default: output_dir/cache
    cache_dtype: str = "float16"  # float16 | bfloat16 | float32: how latents and text states are stored
    streaming: bool = False  # read a `datasets` dataset as a stream (its own shards) instead of loading it
    rows_per_shard: int = 1000  # an imagefolder / loaded dataset is cached in shards of this many rows
    # aspect-ratio buckets: each image resized to the nearest bucket of about resolution^2 pixels (sides multiples
    # of the autoencoder factor x the U-Net's downsampling) and only the remainder cropped; false = centre square
    aspect_buckets: bool = False
    bucket_max_ratio: float = 2.0  # longest / shortest side of the most elongated bucket
    validation_timesteps: int = 8  # the validation loss averages L_simple over this fixed grid of timesteps
    sample_prompts: list[str] = field(default_factory=lambda: ["a cat", "red apple", "rocket", "smiling face"])
    sample_num_inference_steps: int = 25
    sample_guidance_scale: float = 4.0
    sample_seed: int = 0

    def resolve_init(self) -> Path:
        """init_from as a checked text-to-image model folder."""
        init = resolve_model_path(self.init_from)
        check_model_folder(init)
        if read_model_index(init).get("_class_name") != "StableDiffusionPipeline":
            raise UserError(f"init_from {init} is not a text-to-image model folder (model_index.json names "
                            f"{read_model_index(init).get('_class_name')})")
        return init

    def fill_from_init(self, init: Path) -> None:
        """Every setting init_from's folder decides (recipes/inherit.py) taken from it, and its vae/ as the
        autoencoder unless another one of the same latent space is given."""
        self.init_from = str(init)
        inherit_settings(self, init)
        if self.autoencoder:
            check_same_latent_space(self.autoencoder, init)
        self.autoencoder = self.autoencoder or str(init / "vae")

    def validate(self) -> None:
        if self.inpainting and type(self) is LDMTrainConfig:
            raise UserError("inpainting=true selects the inpainting recipe (recipes/inpainting.py), which "
                            "train_ldm.py picks from the config")
        if self.distill and type(self) is LDMTrainConfig:
            raise UserError("distill=true selects the distillation recipe (recipes/consistency.py), which "
                            "train_ldm.py picks from the config")
        if self.controlnet and type(self) is LDMTrainConfig:
            raise UserError("controlnet=true selects the ControlNet recipe (recipes/controlnet.py), which "
                            "train_ldm.py picks from the config")
        if self.init_from:
            self.fill_from_init(self.resolve_init())  # checked once: checksums hash every weight file
        else:
            fill_scratch_defaults(self)
        super().validate()
        if not self.autoencoder:
            raise UserError("autoencoder is required: add autoencoder=DIR (the output_dir of train_autoencoder.py)")
        for key in ("sample_num_inference_steps", "text_max_length", "num_train_timesteps", "validation_timesteps"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.vlb_weight < 0:
            raise UserError(f"vlb_weight must be >= 0, got {self.vlb_weight}")
        if not 0 <= self.cond_drop_prob < 1:
            raise UserError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise UserError(f"unknown beta_schedule '{self.beta_schedule}'; valid: {', '.join(BETA_SCHEDULES)}")
        if self.prediction_type == "flow":
            self.check_flow()
        if self.timestep_density not in TIMESTEP_DENSITIES:
            raise UserError(f"unknown timestep_density '{self.timestep_density}'; valid: "
                            f"{', '.join(TIMESTEP_DENSITIES)}")
        if not (math.isfinite(self.timestep_logit_mean) and math.isfinite(self.timestep_logit_std)
                and self.timestep_logit_std > 0):
            raise UserError(f"timestep_logit_mean must be finite and timestep_logit_std finite and > 0, got "
                            f"{self.timestep_logit_mean} and {self.timestep_logit_std}")
        if self.unet_preset not in PRESETS:
            raise UserError(f"unknown unet_preset '{self.unet_preset}'; valid: {', '.join(PRESETS)}")
        if self.cache_dtype not in DTYPES:
            raise UserError(f"cache_dtype must be one of {', '.join(DTYPES)}, got '{self.cache_dtype}'")
        if self.rows_per_shard < 1:
            raise UserError(f"rows_per_shard must be at least 1, got {self.rows_per_shard}")
        if not self.bucket_max_ratio >= 1:
            raise UserError(f"bucket_max_ratio must be >= 1 (long side / short side), got {self.bucket_max_ratio}")
        if not self.cache_latents and (is_tar_pattern(self.data) or self.streaming or self.aspect_buckets):
            raise UserError("tar shards, streaming=true and aspect_buckets=true are read through the latent cache: "
                            "set cache_latents=true")
        if self.instance_data:
            self.check_dreambooth()
        if self.post_hoc_ema and self.lora:
            raise UserError("post_hoc_ema averages the whole U-Net; with lora=true leave it out (the adapter's EMA "
                            "is ema_decay's)")
        if self.lora:
            if not self.init_from:
                raise UserError("lora=true adapts a trained model: add init_from=DIR (e.g. pipelines/default_model)")
            check_lora_settings(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_target_modules)
        if self.attention not in ("sdpa", "xformers"):
            raise UserError(f"attention must be sdpa or xformers, got '{self.attention}'")
        self.noise_schedule()

    def check_flow(self) -> None:
        """prediction_type=flow (the flow-matching research arm): the text-to-image recipe, its LoRA and DreamBooth
        only, with the plain velocity loss."""
        for key in ("inpainting", "distill", "controlnet"):
            if getattr(self, key):
                raise UserError(f"{key}=true needs a diffusion model; prediction_type=flow (a research arm here) "
                                "trains text-to-image models only")
        if self.min_snr_gamma is not None:
            raise UserError("min_snr_gamma weights a diffusion schedule's timesteps; prediction_type=flow trains "
                            "the plain velocity loss: set min_snr_gamma=null")
        if self.offset_noise:
            raise UserError("offset_noise with prediction_type=flow would end the path off the Gaussian its sampler "
                            "starts from: leave offset_noise at 0")

    def needs_data(self) -> bool:
        return not self.instance_data  # DreamBooth trains on instance_data; data then only gives validation images

    def check_dreambooth(self) -> None:
        if not self.init_from:
            raise UserError("instance_data (DreamBooth) adapts a trained model: add init_from=DIR")
        if self.inpainting:
            raise UserError("instance_data (DreamBooth) trains the text-to-image recipe; set inpainting=false")
        if not self.identifier or not self.identifier.strip():
            raise UserError("identifier is required with instance_data: the rare word that names your subject in "
                            "instance_prompt, e.g. identifier=sks with instance_prompt='a sks dog'")
        if self.identifier not in self.instance_prompt.split():
            raise UserError(f"instance_prompt '{self.instance_prompt}' does not contain the identifier "
                            f"'{self.identifier}' as a word; e.g. instance_prompt='a {self.identifier} dog'")
        if self.class_prompts and self.num_class_images < 1:
            raise UserError(f"num_class_images must be at least 1 with class_prompts, got {self.num_class_images}")
        if not (math.isfinite(self.prior_loss_weight) and self.prior_loss_weight >= 0):
            raise UserError(f"prior_loss_weight must be a number >= 0, got {self.prior_loss_weight}")

    def noise_schedule(self) -> NoiseSchedule:
        try:
            return NoiseSchedule(self.num_train_timesteps, self.beta_schedule, self.beta_start, self.beta_end,
                                 self.prediction_type, self.zero_terminal_snr, self.learned_variance)
        except ValueError as err:
            raise UserError(str(err)) from err


class LDMTrainer(Trainer):
    """The latent diffusion stage's hooks on the one loop (core/trainer.py)."""

    name = "ldm"
    pipeline_class = Pipeline  # what samples and exports the trained U-Net

    def load_frozen_stages(self, device: torch.device) -> None:
        """The autoencoder and text encoder (eval mode, no gradients, outside the optimiser and the training state),
        the noise schedule and the resolution."""
        config = self.config
        self.vae = load_autoencoder(config.autoencoder).to(device).eval().requires_grad_(False)
        self.text_encoder = load_text_encoder(config.text_encoder, config.text_max_length).to(device)
        self.schedule = config.noise_schedule()
        self.factor = downsampling_factor(self.vae)
        self.resolution = config.resolution or self.vae.config.sample_size
        if self.resolution % self.factor:
            raise UserError(f"resolution {self.resolution} is not a multiple of the autoencoder's factor "
                            f"{self.factor}")
        logger.info("autoencoder %s: f=%d, scaling_factor %.4f; text encoder %s (dim %d)", config.autoencoder,
                    self.factor, self.vae.config.scaling_factor, config.text_encoder, self.text_encoder.hidden_size)

    def build_cache(self, state) -> CachedLatents:
        """This config's latent/text cache, built where missing (every rank of `state` its own shards)."""
        config = self.config
        if not hasattr(self, "vae"):
            self.load_frozen_stages(state.device)
        source = open_source(config.data, config.train_split, config.image_column, config.caption_column,
                             config.streaming, config.rows_per_shard)
        bucketer = Bucketer(self.resolution, self.factor * self.unet_size_multiple(), config.aspect_buckets,
                            config.bucket_max_ratio)
        inputs = CacheInputs(source, tuple(config.caption_templates), bucketer, self.vae, self.text_encoder,
                             config.cache_dtype, workers=config.num_workers, control_type=self.cached_control_type())
        return load_or_build_cache(state, inputs, config.cache_dir or Path(config.output_dir) / "cache")

    def cached_control_type(self) -> str | None:
        """The kind of control map the cache also stores per image: none here (the ControlNet recipe's)."""
        return None

    def build_data(self) -> tuple[torch.utils.data.Dataset, Callable]:
        config = self.config
        self.load_frozen_stages(self.accelerator.device)
        self.cache = None
        if config.instance_data:
            return self.build_dreambooth_data()
        if config.cache_latents:
            self.cache = self.build_cache(self.accelerator)
            dataset, collate = self.cache, torch.utils.data.default_collate
        else:
            train_ds = load_image_caption_dataset(config.data, config.train_split, config.image_column,
                                                  config.caption_column)
            check_caption_templates(train_ds, config.caption_column, tuple(config.caption_templates))
            dataset, collate = ImageCaptionDataset(train_ds, self.resolution, config.image_column,
                                                   config.caption_column, tuple(config.caption_templates)), self.collate
        self.held_out = held_out_indices(len(dataset), config.validation_fraction, config.seed)
        self.validation_rows = validation_rows(dataset, self.held_out, self.open_validation_split,
                                               config.validation_max_images, config.data)
        return (dataset if self.cache is not None else without(dataset, self.held_out)), collate

    def build_dreambooth_data(self) -> tuple[torch.utils.data.Dataset, Callable]:
        """The instance images (and class images, drawn where missing by every rank, its share), read as pixels;
        validation images from data's validation split when data is given, less the instance images."""
        config = self.config
        instance = [load_image(f, self.resolution) for f in image_files(config.instance_data, "instance_data")]
        paths = []
        if config.class_prompts:
            folder = Path(config.class_data_dir or Path(config.output_dir) / "class_images")
            drawing = {"base_fingerprint": model_fingerprint(Path(config.init_from)),
                       "num_inference_steps": config.sample_num_inference_steps,
                       "guidance_scale": config.sample_guidance_scale, "seed": config.seed}
            paths = class_images(folder, list(config.class_prompts), config.num_class_images,
                                 lambda: Pipeline(model=config.init_from).to(self.accelerator.device), drawing,
                                 self.accelerator.process_index, self.accelerator.num_processes)
        logger.info("DreamBooth: %d instance images of '%s'%s", len(instance), config.instance_prompt,
                    f", {len(paths)} class images (prior_loss_weight {config.prior_loss_weight:g})" if paths else "")
        dataset = DreamBoothDataset(instance, config.instance_prompt, paths, list(config.class_prompts),
                                    self.resolution, config.batch_size * self.accelerator.num_processes)
        self.held_out = torch.zeros(0, dtype=torch.int64)
        rows = validation_rows(dataset, self.held_out, self.open_validation_split, config.validation_max_images,
                               config.data or "instance_data")
        self.validation_rows = without_instance_images(rows, instance)
        return dataset, dreambooth_collate

    def open_validation_split(self) -> ImageCaptionDataset:
        """The data's validation split as training reads it (folders and loaded datasets; shards have no splits)."""
        config = self.config
        if not config.data:
            raise UserError("no data given")
        if is_tar_pattern(config.data) or config.streaming:
            raise UserError("tar shards and streamed datasets have no splits")
        held = load_image_caption_dataset(config.data, config.validation_split, config.image_column,
                                          config.caption_column)
        return ImageCaptionDataset(held, self.resolution, config.image_column, config.caption_column,
                                   tuple(config.caption_templates))

    @torch.no_grad()
    def build_validation(self) -> list[dict]:
        """The held-out rows encoded once: posterior means (no sampling) and the first caption variant's states."""
        rows, device = self.validation_rows, self.accelerator.device
        per_batch = max(1, self.config.batch_size // self.config.validation_timesteps)
        batches = []
        for start in range(0, len(rows), per_batch):
            chunk = rows[start:start + per_batch]
            if "latent_mean" in chunk[0]:  # cache rows
                mean = torch.stack([r["latent_mean"] for r in chunk]).to(device)
                context = self.cache.text_states(torch.stack([r["shard"] for r in chunk]),
                                                 torch.stack([r["caption_ids"][0] for r in chunk])).to(device)
                batch = {}
            else:
                pixels = torch.stack([r["pixel_values"] for r in chunk]).to(device)
                mean = self.vae.encode(pixels).latent_dist.mean
                context = self.text_encoder.encode([r["captions"][0] for r in chunk]).hidden_states
                batch = {"pixel_values": pixels}
            batches.append({**batch, **self.validation_inputs(chunk), "context": context.float(),
                            "latents": mean.float() * self.vae.config.scaling_factor})
        if batches:
            logger.info("validation: %d held-out images x %d timesteps", len(rows), self.config.validation_timesteps)
        return batches

    def validation_inputs(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """What else a held-out batch carries for this recipe's loss: nothing here (the ControlNet's control maps)."""
        return {}

    def validation_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """L_simple (unweighted MSE of the prediction target) per image, averaged over a fixed timestep grid."""
        k, count = self.config.validation_timesteps, len(batch["latents"])
        steps = ((torch.arange(k) + 0.5) * self.schedule.num_train_timesteps / k).long()
        latents = batch["latents"].repeat_interleave(k, 0)
        timesteps = steps.repeat(count).to(latents.device)
        noise = torch.randn(latents.shape, device=latents.device)
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        repeated = {key: v.repeat_interleave(k, 0) for key, v in batch.items() if key not in ("latents", "context")}
        extra = self.extra_inputs(repeated, latents)
        prediction = self.denoise(model, noisy, self.schedule.model_timesteps(timesteps),
                                  batch["context"].repeat_interleave(k, 0), extra)
        prediction = prediction[:, :latents.shape[1]]  # the mean part of a learned-variance output
        target = self.schedule.target(latents, noise, timesteps)
        per_row = (prediction.float() - target.float()).square().flatten(1).mean(1)
        return per_row.reshape(count, k).mean(1)

    def build_loader(self, dataset: torch.utils.data.Dataset, collate: Callable) -> tuple[torch.utils.data.DataLoader,
                                                                                            bool]:
        """From the cache: one bucket per batch, split across ranks by core/data/batches.py (so not prepared)."""
        if self.cache is None:
            return super().build_loader(dataset, collate)
        sampler = BucketBatchSampler(self.cache.bucket_of, self.config.batch_size, self.config.seed,
                                     self.accelerator.process_index, self.accelerator.num_processes,
                                     exclude=self.held_out)
        # its own generator: starting an iterator (each epoch, and on resume) then leaves the global RNG untouched
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                           num_workers=self.config.num_workers,
                                           generator=torch.Generator().manual_seed(self.config.seed)), False

    def unet_size_multiple(self) -> int:
        """How many times the U-Net halves its input (a latent side must divide by 2 to that power)."""
        if self.config.init_from:
            config = json.loads((Path(self.config.init_from) / "unet" / "config.json").read_text())
            return size_multiple(config["block_out_channels"])
        return size_multiple(PRESETS[self.config.unet_preset]["block_out_channels"])

    def load_init_unet(self) -> UNet2DConditionModel:
        """init_from's U-Net in float32, checked against this run's latents and text encoder (its variance setting is
        inherited from it: recipes/inherit.py)."""
        init = Path(self.config.init_from)
        unet = UNet2DConditionModel.from_pretrained(init / "unet", torch_dtype=torch.float32, use_safetensors=True)
        latent_size = self.resolution // self.factor
        if unet.config.sample_size != latent_size:
            raise UserError(f"init_from's U-Net was trained on {unet.config.sample_size}x{unet.config.sample_size} "
                            f"latents; resolution {self.resolution} gives {latent_size}x{latent_size}")
        if unet.config.cross_attention_dim != self.text_encoder.hidden_size:
            raise UserError(f"init_from's U-Net attends to {unet.config.cross_attention_dim}-d text states; text "
                            f"encoder {self.config.text_encoder} gives {self.text_encoder.hidden_size}")
        return unet

    def initial_unet(self) -> UNet2DConditionModel:
        """The U-Net training starts from: init_from's, or a fresh `unet_preset`."""
        config = self.config
        if config.init_from:
            return self.load_init_unet()
        return build_unet(config.unet_preset, self.resolution // self.factor, self.vae.config.latent_channels,
                          self.text_encoder.hidden_size, config.learned_variance)

    def build_model(self) -> nn.Module:
        config = self.config
        unet = self.initial_unet()
        if config.lora:
            self.base_fingerprint = base_fingerprint(unet)
            add_lora(unet, config.lora_rank, config.lora_alpha, config.lora_target_modules, config.lora_dropout)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if config.attention == "xformers":
            enable_xformers(unet)
        return unet

    def build_extras(self) -> None:
        self.unet_forward = torch.compile(self.model) if self.config.compile else self.model

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
        chosen = batch["caption_ids"][torch.arange(len(mean)), variant].masked_fill(drop, -1)  # -1: dropped
        context = self.cache.text_states(batch["shard"], chosen)  # only the drawn variant's states are read
        return sample * self.vae.config.scaling_factor, context.to(device)

    def extra_inputs(self, batch: dict, latents: torch.Tensor) -> torch.Tensor | None:
        """What the denoiser takes beside the noisy latents and the text: none for text-to-image (the inpainting
        recipe's mask and masked-image latents, the ControlNet recipe's control maps)."""
        return None

    def denoise(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                extra: torch.Tensor | None) -> torch.Tensor:
        """The trained model's prediction: the U-Net on the noisy latents with `extra` as further input channels."""
        model_input = noisy if extra is None else torch.cat([noisy, extra], dim=1)
        return model(model_input, timesteps, encoder_hidden_states=context).sample

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """L_simple (or its weighted variants) for one batch: noise the latents at random t, predict, compare."""
        latents, context = self.encode_batch(batch)
        extra = self.extra_inputs(batch, latents)
        noise = sample_noise(latents, self.config.offset_noise)
        timesteps = sample_timesteps(latents.shape[0], self.schedule.num_train_timesteps, latents.device,
                                     self.config.timestep_density, self.config.timestep_logit_mean,
                                     self.config.timestep_logit_std)
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        prediction = self.denoise(self.unet_forward, noisy, self.schedule.model_timesteps(timesteps), context, extra)
        target = self.schedule.target(latents, noise, timesteps)
        weights = self.schedule.loss_weights(timesteps, self.config.min_snr_gamma)
        if "prior" in batch:  # DreamBooth: instance + prior_loss_weight x class images
            weights = weights * prior_weights(batch["prior"], self.config.prior_loss_weight).to(weights.device)
        if not self.config.learned_variance:
            return {"loss": diffusion_loss(prediction, target, weights)}
        mean_output, variance_output = prediction.split(latents.shape[1], dim=1)
        simple = diffusion_loss(mean_output, target, weights)
        # improved DDPM's hybrid objective: the bound's term at the sampled t, with the mean detached so that
        # L_vlb trains only the variance; T * L_t estimates the whole bound, in bits per latent dimension
        x0_hat = self.schedule.predicted_x0(noisy, timesteps, mean_output.detach())
        variance = self.schedule.learned_variance_from(variance_output, timesteps)
        vlb = vlb_term(self.schedule, latents, noisy, timesteps, x0_hat.float(), variance.float())
        vlb = (vlb / (latents[0].numel() * math.log(2))).mean() * self.schedule.num_train_timesteps
        return {"loss": simple + self.config.vlb_weight * vlb, "simple": simple.detach(), "vlb": vlb.detach()}

    def inference_pipeline(self) -> Pipeline:
        """The EMA U-Net with the frozen stages and the default sampler on the training noise schedule."""
        return self.sampling_pipeline(self.inference_model())

    def sampling_pipeline(self, unet: UNet2DConditionModel) -> Pipeline:
        """`unet` with the frozen stages and the default sampler on the training noise schedule."""
        # a learned-variance model saves the sampler that uses its variance (DDPM), so diffusers picks it too; a
        # flow-matching one its flow sampler
        name = "flow-euler" if self.schedule.is_flow else "ddpm" if self.config.learned_variance else DEFAULT_SCHEDULER
        scheduler = SCHEDULERS[name].from_config(self.schedule.to_scheduler_config())
        return self.pipeline_class(vae=self.vae, text_encoder=self.text_encoder, unet=unet, scheduler=scheduler)

    def make_samples(self) -> tuple[str, Image.Image]:
        """Fixed prompts and seed, EMA weights: one row per sampling step."""
        images = self.inference_pipeline().generate(
            self.config.sample_prompts, num_inference_steps=self.config.sample_num_inference_steps,
            guidance_scale=self.config.sample_guidance_scale, seed=self.config.sample_seed, progress=False)
        return "samples", make_grid(images, columns=len(images))

    def write_export(self, folder: Path) -> None:
        """A diffusers StableDiffusionPipeline folder with the EMA U-Net; for LoRA, the EMA adapter alone."""
        if self.config.lora:
            write_adapter(folder, self.inference_model(), {"base_model": base_model_name(Path(self.config.init_from)),
                                                           "base_fingerprint": self.base_fingerprint})
            return
        pipe = self.inference_pipeline()
        write_model_folder(folder, pipe.vae, pipe.text_encoder, pipe.unet, pipe.scheduler)


def run(config: LDMTrainConfig) -> Path:
    """setup -> train -> export -> cleanup."""
    return LDMTrainer(config).run()
