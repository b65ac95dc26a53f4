"""Text-to-image sampling: `Pipeline("a cat").generate()`.

Components and argument names follow diffusers' StableDiffusionPipeline, and so does every random draw, so that for
the same model folder, seed, scheduler, steps and guidance both give the same image.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import SafetensorError
from tqdm.auto import tqdm

from autoencoder.model import downsampling_factor
from core.errors import UserError
from ldm.classifier import NoisyLatentClassifier, load_classifier
from ldm.diffusion import NoiseSchedule, guidance_embedding
from ldm.text_encoders import load_text_encoder
from pipelines.arguments import MAX_SEED, Limits, guidance_interval, real, text_list, whole
from pipelines.defaults import FAST_NUM_INFERENCE_STEPS, GUIDANCE_SCALE, LCM_MAX_STEPS, NUM_INFERENCE_STEPS
from pipelines.guidance import AutoGuidance, ClassifierFreeGuidance, ClassifierGuidance, EmbeddedGuidance
from pipelines.guide import check_guide
from pipelines.loading import (base_model_name, check_model_folder, read_sampling_defaults, resolve_model_path,
                               text_encoder_spec)
from pipelines.schedulers import (ays_timesteps, check_flow_match, is_flow_scheduler, load_scheduler,
                                  make_scheduler, uses_learned_variance, with_step_schedule)

OUTPUT_TYPES = ("pil", "numpy", "torch", "latent")


class Pipeline:
    """Text-to-image with a trained latent diffusion model.

    `Pipeline("a cat")` loads the embedded default model; `Pipeline(prompt, model=PATH)` a local model folder;
    `Pipeline(vae=..., text_encoder=..., unet=..., scheduler=...)` wraps components already in memory.
    `lora=DIR` (or a list) adds LoRA adapters at `lora_scale` (one number, or one per adapter); see `load_lora`.
    `fast=True` loads the embedded consistency-distilled student of the default model (the `lcm` sampler, 4 steps
    by default, one U-Net call per step) once one ships; none does in this release (docs/distillation.md).
    `guide_model=DIR` guides with that smaller model of the same task instead of the unconditional branch
    (autoguidance; see `load_guide`). `controlnet=DIR` (or a list) steers the U-Net with ControlNets trained on this
    model; `generate(control_image=...)` then takes their maps (see `load_controlnet`).
    """

    inpainting_default = False  # which embedded default `model=None` loads

    def __init__(self, prompt: str | list[str] | None = None, model: str | Path | None = None, *,
                 vae: AutoencoderKL | None = None, text_encoder=None, unet: UNet2DConditionModel | None = None,
                 scheduler: SchedulerMixin | None = None, allow_pickle: bool = False,
                 lora: str | Path | list[str | Path] | None = None, lora_scale: float | list[float] = 1.0,
                 lora_force: bool = False, fast: bool = False, guide_model: str | Path | None = None,
                 controlnet: str | Path | list[str | Path] | None = None, controlnet_force: bool = False) -> None:
        self.prompt = prompt
        self.model_name = "the given components"
        given = [c is not None for c in (vae, text_encoder, unet, scheduler)]
        if any(given) and not all(given):
            raise UserError("pass all four components (vae, text_encoder, unet, scheduler) or none")
        if fast and (model is not None or any(given)):
            raise UserError("fast=True loads the embedded distilled default; for your own student pass only "
                            "model=STUDENT_DIR (its folder samples with the lcm sampler by itself)")
        self.text_encoder_spec: tuple[str, int] | None = None  # (name, length) when loaded from a folder
        self.sampling_defaults: dict = {}  # the folder's own steps and guidance (sampling.json), if it ships them
        if not any(given):
            path = resolve_model_path(model, inpainting=self.inpainting_default, fast=fast)
            check_model_folder(path, allow_pickle)
            self.model_name = base_model_name(path)
            use_safetensors = None if allow_pickle else True
            try:  # fp32 whatever the files hold (the embedded default is stored in fp16); `.to(dtype=...)` to change
                vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=use_safetensors,
                                                    torch_dtype=torch.float32)
                unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=use_safetensors,
                                                            torch_dtype=torch.float32)
            except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # truncated or damaged files
                raise UserError(f"cannot load the model in {path}: {type(err).__name__}: {err}; restore or "
                                "re-export the model folder") from err
            self.text_encoder_spec = text_encoder_spec(path)
            self.sampling_defaults = read_sampling_defaults(path)
            text_encoder = load_text_encoder(*self.text_encoder_spec)
            scheduler = load_scheduler(path / "scheduler")
        self.vae, self.text_encoder, self.unet = vae, text_encoder, unet
        self.model_scheduler = scheduler  # the folder's own sampler; `scheduler` is the one sampling uses now
        self._flow_model = is_flow_scheduler(scheduler)  # fixed by the model's own scheduler, whatever samples later
        self._own_scheduler = True  # False once another sampler is set in its place
        self.check_unet()
        for module in (self.vae, self.unet, self.text_encoder):
            module.eval().requires_grad_(False)
        self._empty_embedding: torch.Tensor | None = None
        self._unet_forward = self.unet  # replaced by a compiled forward after `compile()`; self.unet stays plain
        self.limits = Limits()  # what one call may ask for; raise on purpose
        self.adapters: dict[str, float] = {}  # loaded LoRA adapters and their scales
        self.active_adapters: dict[str, float] = {}  # the ones sampling uses now (activate_lora picks)
        self.consistency_adapters: dict[str, dict] = {}  # LCM-LoRAs among them: name -> their lcm sampler settings
        self._base_fingerprint: str | None = None
        self.controlnets: list = []  # ControlNetModels steering the U-Net (pipelines/controlnet.py)
        self.controlnet_infos: list[dict] = []
        for folder in [] if controlnet is None else [controlnet] if isinstance(controlnet, (str, Path)) \
                else list(controlnet):
            self.load_controlnet(folder, force=controlnet_force)
        folders = [] if lora is None else [lora] if isinstance(lora, (str, Path)) else list(lora)
        scales = lora_scale if isinstance(lora_scale, (list, tuple)) else [lora_scale] * len(folders)
        if len(scales) != len(folders):
            raise UserError(f"lora_scale has {len(scales)} values for {len(folders)} adapters: give one per adapter "
                            "(or one number for all)")
        for folder, scale in zip(folders, scales):
            self.load_lora(folder, scale, force=lora_force)
        self.guide_unet: UNet2DConditionModel | None = None
        self.guide_name: str | None = None
        if self.sampling_defaults:  # before the guide: the folder's settings are checked against the model alone
            self.check_sampling_defaults(path)
        if guide_model is not None:
            self.load_guide(guide_model)

    def check_sampling_defaults(self, path: Path) -> None:
        """The folder's own settings fit this model (its noise levels, its scheduler), or one line naming the file."""
        try:
            self.check_guidance("model")
            schedule = None if self.embeds_guidance else self.sampling_defaults.get("step_schedule")
            if schedule is not None:
                with_step_schedule(self.model_scheduler, schedule)
            if schedule == "ays":
                ays_timesteps(self.own_defaults()[0])
        except UserError as err:
            raise UserError(f"{path / 'sampling.json'}: {err}") from None

    def check_unet(self) -> None:
        """Text-to-image needs a U-Net whose input is the latent alone."""
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise UserError(f"this model's U-Net takes {self.unet.config.in_channels} input channels, an inpainting "
                            "model: use `from pipelines import InpaintPipeline` (or `ldm inpaint`)")
        self.check_output_channels()

    def check_output_channels(self) -> None:
        latent = self.vae.config.latent_channels
        if self.unet.config.out_channels not in (latent, 2 * latent):
            raise UserError(f"the U-Net outputs {self.unet.config.out_channels} channels; a model for this autoencoder "
                            f"outputs {latent} (a prediction) or {2 * latent} (prediction and learned variance)")

    @property
    def embeds_guidance(self) -> bool:
        """A w-conditioned consistency student: the guidance scale is a U-Net input, one call per step."""
        return self.unet.config.get("time_cond_proj_dim") is not None

    @property
    def consistency_adapter(self) -> str | None:
        """The active LCM-LoRA adapter's name, if one is active at a scale other than 0 (the base then samples as
        its student)."""
        return next((name for name, scale in self.active_adapters.items()
                     if name in self.consistency_adapters and scale != 0), None)

    @property
    def is_consistency_student(self) -> bool:
        """A consistency-distilled model (recipes/consistency.py): a full student, or a base with an active
        LCM-LoRA. Follows the active adapters: switching an LCM-LoRA off gives the base's own sampling back."""
        return self.embeds_guidance or self.consistency_adapter is not None

    @property
    def scheduler(self) -> SchedulerMixin:
        """The default sampler now: the folder's own, or the lcm sampler an active LCM-LoRA was distilled for."""
        name = self.consistency_adapter
        if name is None:
            return self.model_scheduler
        return LCMScheduler.from_config({**self.model_scheduler.config, **self.consistency_adapters[name]})

    @scheduler.setter
    def scheduler(self, scheduler: SchedulerMixin) -> None:
        check_flow_match(scheduler, self.is_flow)  # the model decides, not the sampler it is given
        self.model_scheduler = scheduler
        self._own_scheduler = False  # the folder's step schedule (sampling.json) no longer applies

    def own_defaults(self) -> tuple[int, float]:
        """(steps, guidance) the model folder ships as its own (sampling.json), else the library's: what the model
        samples with when no adapter changes it."""
        fallback = FAST_NUM_INFERENCE_STEPS if self.embeds_guidance else NUM_INFERENCE_STEPS
        return (self.sampling_defaults.get("num_inference_steps", fallback),
                float(self.sampling_defaults.get("guidance_scale", GUIDANCE_SCALE)))

    def default_steps(self) -> int:
        """4 with an active LCM-LoRA; else the model's own (`own_defaults`: 4 for a consistency student)."""
        return FAST_NUM_INFERENCE_STEPS if self.consistency_adapter is not None else self.own_defaults()[0]

    def default_guidance_scale(self) -> float:
        """1 (no classifier-free guidance, one call per step) with an active LCM-LoRA, which learnt the guided
        teacher's average; otherwise the model's own (a w-conditioned student takes it as its input)."""
        return 1.0 if self.consistency_adapter is not None else self.own_defaults()[1]

    @property
    def predicts_variance(self) -> bool:
        """A learned-variance U-Net (improved DDPM): the prediction channels, then the variance interpolation."""
        return self.unet.config.out_channels == 2 * self.vae.config.latent_channels

    def load_lora(self, folder: str | Path, scale: float = 1.0, name: str | None = None,
                  force: bool = False) -> str:
        """Add a LoRA adapter (this project's export, or any diffusers-format `pytorch_lora_weights.safetensors`)
        at `scale`, beside those already loaded; returns its name. An adapter recorded as trained on another base
        model is refused unless `force`."""
        from ldm.lora import base_fingerprint, check_base, load_adapter, read_adapter_info

        scale = real("lora_scale", scale, -math.inf)
        info = read_adapter_info(Path(folder))
        name = name or f"adapter_{len(self.adapters)}"
        if name in self.adapters:
            raise UserError(f"an adapter named '{name}' is already loaded; pick another name")
        if self._base_fingerprint is None:  # of the base, before any adapter changes what the U-Net computes
            self._base_fingerprint = base_fingerprint(self.unet)
        check_base(info, self.unet, self._base_fingerprint, self.model_name, force)
        load_adapter(self.unet, info["folder"], name)
        self.register_adapter(name, scale, info.get("consistency"))
        return name

    def register_adapter(self, name: str, scale: float = 1.0, consistency: dict | None = None) -> None:
        """Make an adapter already in the U-Net (loaded, or added by peft in training) known, and activate every
        known one. `consistency` (an LCM-LoRA's record): while it is active the model samples with the lcm sampler on
        that grid, 4 steps and no classifier-free guidance by default."""
        if consistency:
            self.consistency_adapters[name] = {"original_inference_steps": consistency["original_inference_steps"],
                                               "timestep_scaling": consistency["timestep_scaling"]}
        self.adapters[name] = scale
        self._set_active(dict(self.adapters))
        self.unet.eval().requires_grad_(False)

    def _set_active(self, scales: dict[str, float]) -> None:
        """Sample with exactly these adapters at these scales; {} = the base alone."""
        if scales:
            self.unet.enable_adapters()
            self.unet.set_adapters(list(scales), list(scales.values()))
        elif self.adapters:
            self.unet.disable_adapters()
        self.active_adapters = dict(scales)

    def set_lora_scale(self, scales: dict[str, float] | float) -> None:
        """New scales for loaded adapters: one number for all, or {name: scale}."""
        scales = {n: scales for n in self.adapters} if not isinstance(scales, dict) else scales
        self._check_adapter_names(scales)
        self.adapters.update({n: real("lora_scale", v, -math.inf) for n, v in scales.items()})
        self._set_active(dict(self.adapters))

    def _check_adapter_names(self, names) -> None:
        unknown = set(names) - set(self.adapters)
        if unknown:
            raise UserError(f"no loaded adapter named {sorted(unknown)}; loaded: {sorted(self.adapters) or 'none'}")

    def activate_lora(self, scales: dict[str, float]) -> None:
        """Sample with exactly these loaded adapters at these scales ({} = the base alone); the others stay loaded.
        The sampler, step count and guidance defaults follow: an LCM-LoRA's lcm sampler only while it is active."""
        self._check_adapter_names(scales)
        self._set_active({n: real("lora_scale", v, -math.inf) for n, v in scales.items()})

    def fuse_lora(self) -> "Pipeline":
        """Merge the loaded adapters at their scales into the U-Net's weights (diffusers' fuse_lora): sampling then
        costs what the base costs. Scales cannot change afterwards."""
        if not self.adapters:
            raise UserError("no LoRA adapter is loaded: nothing to fuse")
        self.unet.fuse_lora(lora_scale=1.0, adapter_names=list(self.adapters))
        return self

    def load_controlnet(self, folder: str | Path, force: bool = False) -> None:
        """Add a ControlNet (a diffusers ControlNetModel folder; this project's records the base it was trained on,
        checked against this model's U-Net unless `force`). Several add their residuals."""
        from pipelines.controlnet import read_controlnet

        self.add_controlnet(*read_controlnet(folder), force=force)

    def add_controlnet(self, controlnet, info: dict, force: bool = False) -> None:
        """Add a ControlNetModel held in memory (`info`: what `read_controlnet` gives: its folder, and the base it
        records, checked as `load_controlnet` does); the ControlNet recipe's sample grid uses it."""
        from ldm.lora import base_fingerprint
        from pipelines.controlnet import check_controlnet

        if self.embeds_guidance:
            raise UserError("a consistency-distilled student cannot take a ControlNet here; use the model it was "
                            "distilled from")
        if self.adapters:
            raise UserError("load ControlNets before LoRA adapters (their base is checked against the U-Net alone)")
        if self._base_fingerprint is None:
            self._base_fingerprint = base_fingerprint(self.unet)
        check_controlnet(info, controlnet, self.unet, self._base_fingerprint, self.model_name, force)
        self.controlnets.append(controlnet.to(self.device, self.unet.dtype))
        self.controlnet_infos.append(info)

    def load_guide(self, folder: str | Path) -> None:
        """Guide sampling with the U-Net of model folder `folder` (autoguidance, Karras et al. 2024): a smaller,
        shorter-trained model of the same task, e.g. `train_ldm.py --config configs/ldm/emoji-64-guide.yaml`. It
        must share this model's latent space, text encoder and padding length, noise schedule, prediction type and
        U-Net inputs (one line naming both otherwise); students are refused on either side."""
        path = resolve_model_path(folder)
        check_model_folder(path)
        name = base_model_name(path)
        unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True, torch_dtype=torch.float32)
        check_guide(self, name, path, unet)
        self.guide_unet = unet.to(self.device).eval().requires_grad_(False)
        self.guide_name = name

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, allow_pickle: bool = False) -> "Pipeline":
        """Load a model folder; no path = the embedded default model."""
        return cls(model=path, allow_pickle=allow_pickle)

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def vae_scale_factor(self) -> int:
        return downsampling_factor(self.vae)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Pipeline":
        """Move the networks (diffusers-style); the text encoder keeps fp32 unless a dtype is given."""
        for module in (self.vae, self.unet, self.text_encoder, self.guide_unet, *self.controlnets):
            if module is not None:
                module.to(device=device, dtype=dtype)
        self._empty_embedding = None
        return self

    def compile(self, **kwargs) -> "Pipeline":
        """torch.compile the U-Net forward (opt-in: the first call per batch shape compiles, ~1 min on a CPU).

        `self.unet` stays the plain module, so saving never writes `_orig_mod.` keys."""
        self._unet_forward = torch.compile(self.unet, **kwargs)
        return self

    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """A diffusers model folder, written atomically; an existing model folder is replaced only with `overwrite`,
        any other existing folder is refused (never deleted)."""
        from pipelines.loading import save_model_folder

        return save_model_folder(folder, self.vae, self.text_encoder, self.unet, self.scheduler, overwrite,
                                 self.sampling_defaults)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Text hidden states (B, L, D) for the U-Net; the "" embedding is cached (used by every guided call)."""
        if all(p == "" for p in prompts):
            if self._empty_embedding is None:
                self._empty_embedding = self.text_encoder.encode([""]).hidden_states
            return self._empty_embedding.expand(len(prompts), -1, -1)
        return self.text_encoder.encode(prompts).hidden_states

    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        """Channels of the autoencoder's latent (the U-Net may take more: an inpainting U-Net adds mask inputs)."""
        return self.vae.config.latent_channels

    @torch.inference_mode()
    def generate(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_images: int = 1, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 latents: torch.Tensor | None = None, scheduler: str | SchedulerMixin | None = None,
                 output_type: str = "pil", progress: bool = True, classifier=None, class_label: str | None = None,
                 classifier_scale: float = 1.0, guidance_interval: tuple[float, float] | str | None = "model",
                 step_schedule: str | None = "model", control_image=None,
                 controlnet_conditioning_scale: float | list[float] = 1.0):
        """Sample images for `prompt` ("" = unconditional). Returns PIL images, an array, a tensor or latents.

        `scheduler`: a name from pipelines/schedulers.py, a diffusers scheduler, or None for the model's own.
        `num_inference_steps`, `guidance_scale`: default the model's own (its folder's sampling.json), else 30 and
        5; 4 steps for a consistency student (`fast=True`); guidance 1 (no classifier-free guidance) with an active
        LCM-LoRA.
        `classifier` (a folder from train_classifier.py, or the model), `class_label`, `classifier_scale`: classifier
        guidance, alone (prompt "") or on top of classifier-free guidance.
        `guidance_interval` (sigma_lo, sigma_hi]: classifier-free guidance only at steps whose noise level sigma lies
        in it, one U-Net call at the others (Kynkaanniemi et al. 2024); None = every step; "model" (the default) =
        the model folder's own (its sampling.json), every step if it has none.
        `step_schedule`: where the sampler's steps fall, "karras" (Karras sigmas) or "ays" (Align Your Steps);
        None = the sampler's own spacing; "model" (the default) = the model folder's own with its own scheduler
        (sampling.json), the sampler's spacing otherwise.
        `control_image` (one per loaded ControlNet: PIL, numpy or torch, e.g. `ldm.control.control_map(image,
        "canny")`) and `controlnet_conditioning_scale` (one number, or one per ControlNet): ControlNet guidance.
        """
        num_inference_steps = self.default_steps() if num_inference_steps is None else num_inference_steps
        guidance_scale = self.default_guidance_scale() if guidance_scale is None else guidance_scale
        prompts, negative, height, width = self.check_inputs(prompt, negative_prompt, num_images, num_inference_steps,
                                                             guidance_scale, height, width, output_type, seed,
                                                             scheduler)
        interval = self.check_guidance(guidance_interval)
        control = self.check_control(control_image, controlnet_conditioning_scale)
        if classifier is not None and self.is_consistency_student:
            raise UserError("classifier guidance is not available for a consistency-distilled student; use the "
                            "model it was distilled from")
        if negative_prompt is not None and self.embeds_guidance:
            warnings.warn("a consistency student takes the guidance scale as an input and has no unconditional "
                          "branch: negative_prompt is ignored (as in diffusers)", stacklevel=3)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        cond, uncond = self.encode_prompt(prompts, negative, num_images, guidance_scale)
        sampler = self.prepare_scheduler(scheduler, num_inference_steps, step_schedule)
        latents = self.prepare_latents(len(prompts) * num_images, height, width, generator, latents, sampler)
        guided = self.guidance(self.control_denoiser(control, len(prompts) * num_images, height, width), cond, uncond,
                               guidance_scale, interval)
        if classifier is not None:
            guided = self.classifier_guidance(guided, classifier, class_label, classifier_scale, sampler, height)
        latents = self.denoise(latents, guided, sampler, generator, progress)
        return self.decode(latents, output_type)

    def check_inputs(self, prompt, negative_prompt, num_images: int, num_inference_steps: int,
                     guidance_scale: float, height: int | None, width: int | None, output_type: str,
                     seed: int | None = None, scheduler=None) -> tuple[list[str], list[str], int, int]:
        """Validate every argument before any work (pipelines/arguments.py); returns (prompts, negative prompts,
        height, width)."""
        prompt = self.prompt if prompt is None else prompt
        if prompt is None:
            raise UserError("no prompt: pass one to Pipeline(...) or generate(...) ('' for unconditional)")
        prompts = text_list(prompt, "prompt")
        negative = [""] * len(prompts) if negative_prompt is None else text_list(negative_prompt, "negative_prompt")
        if len(negative) == 1 and len(prompts) > 1:
            negative = negative * len(prompts)
        if len(negative) != len(prompts):
            raise UserError(f"got {len(negative)} negative prompts for {len(prompts)} prompts")
        num_images = whole("num_images", num_images, 1)
        whole("num_inference_steps", num_inference_steps, 1, self.scheduler.config.num_train_timesteps)
        real("guidance_scale", guidance_scale, 0)
        if seed is not None:
            whole("seed", seed, 0, MAX_SEED)
        if scheduler is not None and not isinstance(scheduler, (str, SchedulerMixin)):
            raise UserError("scheduler must be a sampler name or a diffusers scheduler, got "
                            f"{type(scheduler).__name__}")
        factor = self.vae_scale_factor
        height = self.default_size() if height is None else whole("height", height, 0)
        width = self.default_size() if width is None else whole("width", width, 0)
        for name, size in (("height", height), ("width", width)):
            if size < factor or size % factor:
                raise UserError(f"{name}={size} is not a multiple of the autoencoder's downsampling factor {factor}; "
                                f"valid sizes: {factor}, {2 * factor}, ..., e.g. {self.default_size()}")
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"unknown output_type '{output_type}'; valid: {', '.join(OUTPUT_TYPES)}")
        self.limits.check(len(prompts) * num_images, height, width)
        return prompts, negative, height, width

    def encode_prompt(self, prompts: list[str], negative: list[str], num_images: int,
                      guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text hidden states per image; the negative prompts' only when guidance needs the second branch."""
        cond = self.text_embeddings(prompts).repeat_interleave(num_images, dim=0).to(self.unet.dtype)
        if self.embeds_guidance or self.guide_unet is not None or \
                not ClassifierFreeGuidance.needs_unconditional(guidance_scale):
            return cond, None
        return cond, self.text_embeddings(negative).repeat_interleave(num_images, dim=0).to(self.unet.dtype)

    def prepare_scheduler(self, scheduler: str | SchedulerMixin | None, num_inference_steps: int,
                          step_schedule: str | None = "model") -> SchedulerMixin:
        """A fresh sampler (schedulers keep state) with its timesteps set, placed by `step_schedule` ("model": the
        folder's own, when sampling with its own scheduler); lcm for consistency students only."""
        if step_schedule == "model":
            own = scheduler is None and self._own_scheduler and not self.is_consistency_student
            step_schedule = self.sampling_defaults.get("step_schedule") if own else None
        sampler = with_step_schedule(make_scheduler(scheduler, self.scheduler), step_schedule)
        self.check_sampler(sampler, num_inference_steps)
        if step_schedule == "ays":
            sampler.set_timesteps(timesteps=ays_timesteps(num_inference_steps), device=self.device)
        else:
            sampler.set_timesteps(num_inference_steps, device=self.device)
        return sampler

    def check_sampler(self, sampler: SchedulerMixin, num_inference_steps: int) -> None:
        """The lcm sampler for consistency students and only for them, within the student's timestep grid; a
        flow-matching sampler for flow-matching models and only for them."""
        check_flow_match(sampler, self.is_flow)
        lcm = isinstance(sampler, LCMScheduler)
        if lcm and not self.is_consistency_student:
            raise UserError(f"the lcm sampler needs a consistency-distilled model, and {self.model_name} is not one: "
                            "use `Pipeline(fast=True)` / `ldm generate --fast` for the embedded student, or your "
                            "student's folder (train_ldm.py --config configs/ldm/emoji-64-lcm.yaml)")
        if self.is_consistency_student and not lcm:
            raise UserError(f"{self.model_name} is a consistency-distilled student: it samples with the lcm sampler "
                            f"(its default; 1-{LCM_MAX_STEPS} steps), not {type(sampler).__name__}")
        if lcm:
            original = sampler.config.original_inference_steps
            if num_inference_steps > original:
                raise UserError(f"num_inference_steps={num_inference_steps} is more than this student's "
                                f"{original}-point timestep grid allows; use 1-{LCM_MAX_STEPS}")
            if num_inference_steps > LCM_MAX_STEPS:
                warnings.warn(f"num_inference_steps={num_inference_steps}: a consistency student is distilled for "
                              f"1-{LCM_MAX_STEPS} steps; more rarely helps", stacklevel=4)

    def prepare_latents(self, batch: int, height: int, width: int, generator: torch.Generator | None,
                        latents: torch.Tensor | None, sampler: SchedulerMixin) -> torch.Tensor:
        """Initial noise of the autoencoder's latent shape (drawn as diffusers draws it), scaled for the sampler."""
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise UserError(f"latents have shape {tuple(latents.shape)}; expected {shape} for these settings")
        # flow-matching samplers start from the noise itself and have no init_noise_sigma / scale_model_input
        return latents.to(self.device, self.unet.dtype) * getattr(sampler, "init_noise_sigma", 1.0)

    def check_guidance(self, interval="model") -> tuple[float, float] | None:
        """The guidance options as they stand now: a guidance interval in this model's noise levels
        (pipelines/arguments.py; "model" = the folder's own, none for a consistency student), none for a
        w-conditioned student (no unconditional branch to leave out); a loaded guide while an LCM-LoRA is active
        refused (a student cannot be autoguided)."""
        if isinstance(interval, str):
            if interval != "model":
                raise UserError(f"guidance_interval must be a pair (sigma_lo, sigma_hi), None (every step) or "
                                f"'model' (the model's own), got {interval!r}")
            interval = None if self.is_consistency_student else self.sampling_defaults.get("guidance_interval")
        if self.guide_unet is not None and self.is_consistency_student:
            raise UserError(f"an LCM-LoRA is active, and a consistency student cannot be autoguided (guide "
                            f"{self.guide_name}); activate_lora({{}}) or another adapter first")
        if interval is not None and self.embeds_guidance:
            raise UserError("guidance_interval needs classifier-free guidance; a consistency student takes the "
                            "guidance scale as an input (one call per step already)")
        if self.is_flow:
            if interval is not None:
                raise UserError("guidance_interval is given in a diffusion schedule's noise levels sigma; a "
                                "flow-matching model is guided at every step here")
            return None
        sigmas = self.noise_schedule.sigmas()
        return guidance_interval(interval, float(sigmas.min()), float(sigmas.max()))

    def check_control(self, control_image, scale) -> tuple[list, list[float]] | None:
        """The control images and scales for the loaded ControlNets, checked before any work; None without any."""
        from pipelines.controlnet import control_images, control_scales

        if not self.controlnets:
            if control_image is not None:
                raise UserError("control_image needs a ControlNet: Pipeline(controlnet=DIR) (or --controlnet DIR)")
            return None
        if self.guide_unet is not None:
            raise UserError("a ControlNet and autoguidance together are not supported: leave out guide_model")
        count = len(self.controlnets)
        return control_images(control_image, count), control_scales(scale, count)

    def control_denoiser(self, control: tuple[list, list[float]] | None, batch: int, height: int, width: int):
        """`denoiser`, or with ControlNets the U-Net with their residuals (pipelines/controlnet.py)."""
        if control is None:
            return self.denoiser
        from diffusers.image_processor import VaeImageProcessor

        from pipelines.controlnet import controlled_denoiser, prepare_control_image

        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True,
                                      do_normalize=False)
        images = [prepare_control_image(processor, image, height, width, batch, self.device, self.unet.dtype)
                  for image in control[0]]
        return controlled_denoiser(self._unet_forward, self.controlnets, images, control[1])

    @property
    def is_flow(self) -> bool:
        """A flow-matching model (prediction_type=flow, ldm/diffusion.py): sampled with flow-euler only."""
        return self._flow_model

    @property
    def noise_schedule(self) -> NoiseSchedule:
        """The training noise schedule the model folder's scheduler config describes."""
        return NoiseSchedule.from_scheduler_config(self.model_scheduler.config)

    def guidance(self, denoiser, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float,
                 interval: tuple[float, float] | None = None, guide_denoiser=None) -> ClassifierFreeGuidance:
        """Classifier-free guidance of the prediction channels (a learned variance is taken from the cond branch),
        or autoguidance with a loaded guide (`guide_denoiser`: the guide's counterpart of `denoiser`), in every step
        or only those with sigma in `interval`; a w-conditioned student takes the scale as an input instead (one
        U-Net call)."""
        if self.embeds_guidance:
            scale = torch.full((cond.shape[0],), float(guidance_scale))
            embedding = guidance_embedding(scale, self.unet.config.time_cond_proj_dim)
            return EmbeddedGuidance(denoiser, cond, embedding.to(self.device, cond.dtype))
        channels = self.latent_channels if self.predicts_variance else None
        if self.guide_unet is not None:
            return AutoGuidance(denoiser, guide_denoiser or self.guide_denoiser, cond, guidance_scale, channels,
                                interval, self.noise_schedule.sigma_at)
        return ClassifierFreeGuidance(denoiser, cond, uncond, guidance_scale, guided_channels=channels,
                                      interval=interval, sigma_at=self.noise_schedule.sigma_at)

    def classifier_guidance(self, guided, classifier, class_label: str | None, scale: float, sampler: SchedulerMixin,
                            height: int) -> ClassifierGuidance:
        """Wrap `guided` with a noisy-latent classifier's gradient, after checking the classifier fits this model."""
        if not isinstance(classifier, NoisyLatentClassifier):
            with torch.inference_mode(False):  # weights made in inference mode could not take part in autograd
                classifier = load_classifier(classifier)
        if class_label is None:
            raise UserError(f"classifier guidance needs class_label=...; valid: {', '.join(classifier.config.labels)}")
        label = classifier.label_index(class_label)
        real("classifier_scale", scale, 0)
        if self.is_flow:
            raise UserError("classifier guidance takes epsilon-prediction diffusion models; this is a flow-matching "
                            "model (prediction_type=flow)")
        classifier.check_fits(self.vae, height // self.vae_scale_factor, height, self.scheduler.config)
        if is_flow_scheduler(sampler) or sampler.init_noise_sigma != 1 or \
                self.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise UserError("classifier guidance needs an epsilon-prediction model and a sampler whose input is x_t "
                            "itself: ddpm, ddim, dpm++ or unipc")
        with torch.inference_mode(False):
            classifier = classifier.to(self.device).eval().requires_grad_(False)
        return ClassifierGuidance(guided, classifier, label, scale, sampler.alphas_cumprod, self.latent_channels)

    def denoiser(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """The U-Net as a denoiser callable (x_t, t, context[, a student's guidance embedding]) -> its prediction."""
        if timestep_cond is None:
            return self._unet_forward(x, t, encoder_hidden_states=context).sample
        return self._unet_forward(x, t, encoder_hidden_states=context, timestep_cond=timestep_cond).sample

    def guide_denoiser(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The guide's U-Net as a denoiser callable (autoguidance)."""
        return self.guide_unet(x, t, encoder_hidden_states=context).sample

    def denoise(self, latents: torch.Tensor, guided: ClassifierFreeGuidance, sampler: SchedulerMixin,
                generator: torch.Generator | None, progress: bool, timesteps: torch.Tensor | None = None,
                after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The sampling loop: one guided prediction and one sampler step per timestep (all of the sampler's, or
        `timesteps`); `after_step(i, latents)` may replace the latents after step i (inpainting's blending)."""
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(sampler.step).parameters else {}
        timesteps = sampler.timesteps if timesteps is None else timesteps
        keep_variance = uses_learned_variance(sampler)
        scale_input = getattr(sampler, "scale_model_input", lambda x, t: x)
        for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
            model_output = guided(scale_input(latents, t), t)
            if not keep_variance:
                model_output = model_output[:, :latents.shape[1]]
            latents = sampler.step(model_output, t, latents, **step_kwargs).prev_sample
            if after_step is not None:
                latents = after_step(i, latents)
        return latents

    def decode(self, latents: torch.Tensor, output_type: str):
        """Latents -> images in [0, 1] as `output_type` ("latent" returns the latents as they are)."""
        if output_type == "latent":
            return latents
        images = (self.vae.decode(latents / self.vae.config.scaling_factor).sample.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "torch":
            return images
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        return array if output_type == "numpy" else images_to_pil(array)


def images_to_pil(images: np.ndarray) -> list[Image.Image]:
    """[0, 1] float (B, H, W, 3) -> PIL, rounding like diffusers' VaeImageProcessor."""
    return [Image.fromarray((image * 255).round().astype("uint8")) for image in images]
