"""Latent consistency distillation: `accelerate launch train_ldm.py --config configs/ldm/emoji-64-lcm.yaml`.

LCM (Luo et al. 2023) on the latent diffusion loop: a frozen teacher (init_from's U-Net), an online student (the
teacher's weights plus a zero-initialised guidance-scale input, `timestep_cond`, or a LoRA on the teacher) and its
EMA as the target network. Per image: a point t_{n+k} of the skipping-step grid, a guidance scale s drawn from
[guidance_scale_min, guidance_scale_max], one DDIM step of the s-guided teacher to t_n, and the pseudo-Huber distance
between the student's f(x_{t_{n+k}}) and the target's f(x_{t_n}). The math is ldm/diffusion.py's; the export samples
with diffusers' LCMScheduler in 1-8 steps, one U-Net call per step. The latent and text caches are the LDM recipe's.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import LCMScheduler, UNet2DConditionModel
from torch import nn

from core.errors import UserError
from core.images import make_grid
from core.trainer import trained_parameters
from ldm.diffusion import (consistency_output, guidance_embedding, guided_ddim_step, pseudo_huber_loss, sample_noise,
                           solver_timesteps)
from ldm.lora import write_adapter
from pipelines.defaults import LCM_MAX_STEPS
from pipelines.loading import base_model_name, write_model_folder
from recipes.latent_diffusion import LDMTrainConfig, LDMTrainer

logger = logging.getLogger(__name__)


@dataclass
class DistillTrainConfig(LDMTrainConfig):
    """A consistency distillation run: the LDM settings (data, caches, loop) plus the LCM ones."""

    distill: bool = True  # what makes train_ldm.py run this recipe
    init_from: str = ""  # the teacher: a text-to-image model folder (the embedded default: pipelines/default_model)
    # the guidance scales the student learns (drawn uniformly per image); it takes the scale as an input
    guidance_scale_min: float = 2.0
    guidance_scale_max: float = 7.0
    num_solver_steps: int = 50  # N of the skipping-step grid (k = T / N); LCMScheduler's original_inference_steps
    huber_c: float = 0.001  # pseudo-Huber parameter of the consistency loss
    timestep_scaling: float = 10.0  # c_skip / c_out's time scale (LCMScheduler's timestep_scaling)
    guidance_embedding_dim: int = 256  # width of the student's guidance-scale input (UNet time_cond_proj_dim)
    use_ema: bool = True  # the target network is the EMA of the student: required
    ema_decay: float = 0.95
    cond_drop_prob: float = 0.0  # the teacher's guidance supplies the unconditional branch
    sample_num_inference_steps: int = 4

    def validate(self) -> None:
        if not self.distill:
            raise UserError("distill=false in a distillation config: remove it, or train with "
                            "configs/ldm/<preset>.yaml")
        if not self.init_from:
            raise UserError("distill=true needs a teacher: add init_from=DIR (a text-to-image model folder, e.g. "
                            "pipelines/default_model)")
        if self.inpainting:
            raise UserError("distillation supports text-to-image teachers only (inpainting=true is not supported)")
        if self.learned_variance:
            raise UserError("distillation supports fixed-variance teachers only (learned_variance=true is not "
                            "supported)")
        if self.instance_data:
            raise UserError("instance_data (DreamBooth) cannot be combined with distill=true")
        if self.post_hoc_ema:
            raise UserError("post_hoc_ema is for denoiser training; distillation's EMA is its target network "
                            "(ema_decay): leave post_hoc_ema out")
        if self.timestep_density != "uniform":
            raise UserError(f"timestep_density={self.timestep_density}: distillation draws its timesteps from the "
                            "solver grid (num_solver_steps); leave timestep_density out")
        if not self.use_ema:
            raise UserError("distill=true needs use_ema=true: the EMA of the student is the target network")
        lo, hi = self.guidance_scale_min, self.guidance_scale_max
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
            raise UserError(f"guidance_scale_min and guidance_scale_max must be finite with 0 <= min <= max, got "
                            f"{lo:g} and {hi:g}")
        if not (self.huber_c > 0 and math.isfinite(self.huber_c)):
            raise UserError(f"huber_c must be a number > 0, got {self.huber_c}")
        if not self.timestep_scaling > 0:
            raise UserError(f"timestep_scaling must be > 0, got {self.timestep_scaling}")
        if self.guidance_embedding_dim < 2:
            raise UserError(f"guidance_embedding_dim must be at least 2, got {self.guidance_embedding_dim}")
        super().validate()  # fills the teacher's settings in
        if not 1 <= self.num_solver_steps <= self.num_train_timesteps:
            raise UserError(f"num_solver_steps must be in [1, num_train_timesteps={self.num_train_timesteps}], got "
                            f"{self.num_solver_steps}")

    def fill_from_init(self, init: Path) -> None:
        """The teacher's settings (recipes/inherit.py); a learned-variance teacher refused."""
        unet, vae = (json.loads((init / part / "config.json").read_text()) for part in ("unet", "vae"))
        if unet.get("out_channels") == 2 * vae.get("latent_channels", 4):
            raise UserError(f"init_from {init} is a learned-variance model; distillation supports fixed-variance "
                            "text-to-image teachers only")
        super().fill_from_init(init)

    def lcm_scheduler(self) -> LCMScheduler:
        """The sampler the student is trained for: the teacher's noise schedule on LCM's timestep grid."""
        return LCMScheduler.from_config({**self.noise_schedule().to_scheduler_config(),
                                         "original_inference_steps": self.num_solver_steps,
                                         "timestep_scaling": self.timestep_scaling})


def student_from(teacher: UNet2DConditionModel, embedding_dim: int) -> UNet2DConditionModel:
    """The teacher's U-Net with a guidance-scale input (`time_embedding.cond_proj`, zero-initialised so the student
    starts as the teacher) and all of the teacher's weights."""
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": embedding_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing == ["time_embedding.cond_proj.weight"], (missing, unexpected)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student


class DistillTrainer(LDMTrainer):
    """The LCM hooks on the LDM trainer: student, teacher, target; the consistency loss; an LCMScheduler export."""

    name = "lcm"

    def load_init_unet(self) -> UNet2DConditionModel:
        unet = super().load_init_unet()
        if unet.config.time_cond_proj_dim is not None:
            raise UserError(f"init_from {self.config.init_from} is already a consistency student (its U-Net takes a "
                            "guidance-scale input); distil from a text-to-image teacher")
        return unet

    def initial_unet(self) -> UNet2DConditionModel:
        """The student (the teacher's weights; plus the guidance input unless it is a LoRA); the teacher is kept."""
        teacher = self.load_init_unet()
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False).to(self.accelerator.device)
        self.grid = solver_timesteps(self.schedule.num_train_timesteps, self.config.num_solver_steps)
        return teacher if self.config.lora else student_from(teacher, self.config.guidance_embedding_dim)

    def build_extras(self) -> None:
        """The target network: a frozen copy of the student whose weights are the EMA's, refreshed every step."""
        super().build_extras()
        target = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval()
        self.target_params = trained_parameters(target)  # matches the EMA's list, in order
        self.target = target.requires_grad_(False)

    @property
    def embeds_guidance(self) -> bool:
        return not self.config.lora

    def empty_context(self, like: torch.Tensor) -> torch.Tensor:
        """The "" prompt's text states, one per row of `like`."""
        if self.cache is not None:
            empty = self.cache.empty_embedding.to(like.device, like.dtype)
        else:
            empty = self.text_encoder.encode([""]).hidden_states[0].to(like.dtype)
        return empty.expand(like.shape[0], *empty.shape[-2:])

    def student_kwargs(self, scale: torch.Tensor) -> dict:
        if not self.embeds_guidance:
            return {}
        return {"timestep_cond": guidance_embedding(scale, self.config.guidance_embedding_dim)}

    def consistency_pair(self, student: nn.Module, target: nn.Module, latents: torch.Tensor, context: torch.Tensor,
                         index: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student's f at t_{n+k}, target's f at t_n after one guided teacher step): the two sides of the loss."""
        config, schedule = self.config, self.schedule
        device = latents.device
        start = self.grid.to(device)[index]
        previous = (start - schedule.num_train_timesteps // config.num_solver_steps).clamp(min=0)
        noisy = schedule.add_noise(latents, sample_noise(latents), start)
        kwargs = self.student_kwargs(scale)
        output = student(noisy, start, encoder_hidden_states=context, **kwargs).sample
        prediction = consistency_output(schedule, noisy, start, output, config.timestep_scaling)
        with torch.no_grad(), self.accelerator.autocast():  # the teacher and target are not prepared modules
            both = self.teacher(torch.cat([noisy, noisy]), torch.cat([start, start]),
                                encoder_hidden_states=torch.cat([context, self.empty_context(context)])).sample
            cond, uncond = both.float().chunk(2)
            earlier = guided_ddim_step(schedule, noisy.float(), start, previous, cond, uncond, scale)
            target_output = target(earlier.to(noisy.dtype), previous, encoder_hidden_states=context, **kwargs).sample
            goal = consistency_output(schedule, earlier, previous, target_output.float(), config.timestep_scaling)
        return prediction, goal

    def draw_guidance(self, count: int, device: torch.device) -> torch.Tensor:
        lo, hi = self.config.guidance_scale_min, self.config.guidance_scale_max
        return lo + (hi - lo) * torch.rand(count, device=device)

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """The consistency distillation loss for one batch (LCM algorithm 1, one step)."""
        latents, context = self.encode_batch(batch)
        with torch.no_grad():
            self.ema.copy_to(self.target_params)
        index = torch.randint(0, self.config.num_solver_steps, (latents.shape[0],), device=latents.device)
        scale = self.draw_guidance(latents.shape[0], latents.device)
        prediction, goal = self.consistency_pair(self.unet_forward, self.target, latents, context, index, scale)
        return {"loss": pseudo_huber_loss(prediction, goal, self.config.huber_c)}

    def validation_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The consistency loss of the EMA student against itself along the teacher's guided trajectory, per image,
        on a fixed grid of solver points and the middle guidance scale."""
        k, count = self.config.validation_timesteps, len(batch["latents"])
        latents = batch["latents"].repeat_interleave(k, 0)
        context = batch["context"].repeat_interleave(k, 0)
        index = ((torch.arange(k) + 0.5) * self.config.num_solver_steps / k).long().repeat(count).to(latents.device)
        middle = (self.config.guidance_scale_min + self.config.guidance_scale_max) / 2
        scale = torch.full((len(latents),), middle, device=latents.device)
        prediction, goal = self.consistency_pair(model, model, latents, context, index, scale)
        c = self.config.huber_c
        per_element = torch.sqrt((prediction.float() - goal.float()).square() + c * c) - c
        return per_element.flatten(1).mean(1).reshape(count, k).mean(1)

    def inference_pipeline(self):
        """The EMA student with the frozen stages and the LCM sampler it was trained for."""
        return self.pipeline_class(vae=self.vae, text_encoder=self.text_encoder, unet=self.inference_model(),
                                   scheduler=self.config.lcm_scheduler())

    def make_samples(self):
        """Fixed prompts and seed, EMA student, `sample_num_inference_steps` LCM steps (a LoRA student: no CFG)."""
        pipe = self.inference_pipeline()
        if self.config.lora:  # the peft adapter training added ("default"), as an LCM-LoRA
            pipe.register_adapter("default", 1.0, {"original_inference_steps": self.config.num_solver_steps,
                                                   "timestep_scaling": self.config.timestep_scaling})
        images = pipe.generate(self.config.sample_prompts, num_inference_steps=self.config.sample_num_inference_steps,
                               guidance_scale=self.config.sample_guidance_scale if self.embeds_guidance else 1.0,
                               seed=self.config.sample_seed, progress=False)
        return "samples", make_grid(images, columns=len(images))

    def write_export(self, folder: Path) -> None:
        """A diffusers folder with the student and LCMScheduler; a LoRA student: the adapter, marked as LCM."""
        config = self.config
        if config.lora:
            write_adapter(folder, self.inference_model(),
                          {"base_model": base_model_name(Path(config.init_from)),
                           "base_fingerprint": self.base_fingerprint,
                           "consistency": {"original_inference_steps": config.num_solver_steps,
                                           "timestep_scaling": config.timestep_scaling,
                                           "guidance_scale_range": [config.guidance_scale_min,
                                                                    config.guidance_scale_max],
                                           "max_steps": LCM_MAX_STEPS}})
            return
        pipe = self.inference_pipeline()
        write_model_folder(folder, pipe.vae, pipe.text_encoder, pipe.unet, pipe.scheduler)


def run(config: DistillTrainConfig) -> Path:
    """setup -> train -> export -> cleanup."""
    return DistillTrainer(config).run()
