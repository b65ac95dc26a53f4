"""Inpainting: `InpaintPipeline("a cat", image=..., mask=...).generate()` fills the white part of the mask.

Three methods:
- `unet`: a fine-tuned inpainting U-Net (9 input channels: noisy latents, mask, masked-image latents; the layout of
  Stable Diffusion's inpainting checkpoints and of `recipes/inpainting.py`);
- `blend`, for a text-to-image U-Net used as is: after each step the known region is replaced by the original
  latents noised to the next timestep (diffusers' 4-channel path of `StableDiffusionInpaintPipeline`);
- `repaint`, for a text-to-image U-Net: RePaint's resampling (Lugmayr et al. 2022) with diffusers' RePaintScheduler
  in latent space: known region from the noised original at each step, and every `repaint_jump_length` steps the
  sample is re-noised that far and denoised again, `repaint_jump_n_sample` times (about that many times the U-Net
  calls of `blend`).

Inputs, random draws and steps follow diffusers' `StableDiffusionInpaintPipeline`, so with paste-back off both give
the same pixels for the same folder, seed and settings. Paste-back (on by default) puts the original pixels back
outside the mask, optionally with a feathered edge: the autoencoder round trip otherwise shifts the known pixels.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers import RePaintScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

from core.errors import UserError
from ldm.inpainting import encode_masked_image, mask_at_latent_size, unet_conditioning
from pipelines.arguments import image_input, mask_input, real, whole
from pipelines.defaults import INPAINT_METHODS, LATENT_MASKS
from pipelines.guidance import ClassifierFreeGuidance
from pipelines.img2img import Img2ImgPipeline

logger = logging.getLogger(__name__)

class InpaintPipeline(Img2ImgPipeline):
    """Inpainting with a trained latent diffusion model (an inpainting fine-tune, or a text-to-image model).

    `InpaintPipeline(prompt, image=..., mask_image=...)` (alias `mask=`): PIL, numpy or torch, as diffusers takes
    them; white (>= 0.5) = repaint. No `model` = the embedded inpainting default (fine-tuned from the text-to-image
    default); `model=DIR` also takes a text-to-image model, used with `blend` or `repaint`.
    """

    inpainting_default = True

    def __init__(self, prompt: str | list[str] | None = None, model=None, *, image=None, mask_image=None, mask=None,
                 **components) -> None:
        super().__init__(prompt, model, image=image, **components)
        if not self.is_inpainting_unet:  # a text-to-image model's own settings were measured for text-to-image, not
            self.sampling_defaults = {}  # for latent blending or RePaint: those use the library's defaults
        self.mask_image = _one_mask(mask_image, mask)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)

    @property
    def is_inpainting_unet(self) -> bool:
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    def check_unet(self) -> None:
        latent = self.vae.config.latent_channels
        if self.unet.config.in_channels not in (latent, 2 * latent + 1):
            raise UserError(f"the U-Net takes {self.unet.config.in_channels} input channels; inpainting needs "
                            f"{2 * latent + 1} (an inpainting fine-tune) or {latent} (text-to-image, method='blend')")
        if self.embeds_guidance:
            raise UserError("a consistency-distilled student (fast model) cannot inpaint here; use the inpainting "
                            "default or the model it was distilled from")
        self.check_output_channels()

    @torch.inference_mode()
    def generate(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_images: int = 1, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 latents: torch.Tensor | None = None, scheduler: str | SchedulerMixin | None = None,
                 output_type: str = "pil", progress: bool = True, *, image=None, mask_image=None, mask=None,
                 strength: float = 1.0, masked_image_latents: torch.Tensor | None = None, method: str | None = None,
                 repaint_jump_length: int = 10, repaint_jump_n_sample: int = 10, latent_mask: str = "nearest",
                 paste_back: bool = True, feather: float = 0.0,
                 guidance_interval: tuple[float, float] | str | None = "model",
                 step_schedule: str | None = "model"):
        """Fill the mask of `image` from `prompt`; `Pipeline.generate`'s arguments in its order, then the
        inpainting ones by keyword. `strength` < 1 starts from the noised image instead of noise; `method`: None
        (= `unet` for an inpainting U-Net, `blend` otherwise); `latent_mask`: how `blend` and `repaint` take the
        mask to latent cells, "nearest" (diffusers': one pixel per cell decides) or "cover" (a cell is repainted if
        any of its pixels is masked); `feather`: paste-back edge blur in pixels. Image and mask are resized to
        `height` x `width` (default: the image's size); `guidance_interval`, `step_schedule`: as in
        `Pipeline.generate`."""
        # 1. check inputs
        num_inference_steps = self.default_steps() if num_inference_steps is None else num_inference_steps
        guidance_scale = self.default_guidance_scale() if guidance_scale is None else guidance_scale
        image, mask_image, method, prompts, negative, height, width = self._check_all_inputs(
            prompt, negative_prompt, num_images, num_inference_steps, guidance_scale, height, width, output_type, seed,
            scheduler, image, mask_image, mask, method, strength, latent_mask, repaint_jump_length,
            repaint_jump_n_sample, paste_back, feather)
        interval = self.check_guidance(guidance_interval)
        # 2. prepare image and mask (an empty mask returns the image unchanged)
        init_image, mask_condition = self.prepare_image_and_mask(image, mask_image, height, width)
        batch = len(prompts) * num_images
        if not mask_condition.any():
            return self.unchanged(init_image, batch, output_type)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        # 3. encode prompt
        cond, uncond = self.encode_prompt(prompts, negative, num_images, guidance_scale)
        # 4. prepare latents: the start, the image's latents, the mask and the masked image at latent size
        sampler, timesteps = self.prepare_strength_scheduler(scheduler, num_inference_steps, strength, step_schedule)
        latents, noise, image_latents = self.prepare_inpaint_latents(
            batch, height, width, generator, latents, sampler, init_image, timesteps, strength,
            need_image_latents=method != "unet" or (latents is None and strength < 1))
        mask_latents, masked_latents = self.prepare_mask_latents(mask_condition, init_image, masked_image_latents,
                                                                 batch, generator, cover=latent_mask == "cover")
        # 5. denoise, per method
        latents = self._denoise_per_method(method, latents, cond, uncond, guidance_scale, interval, sampler, timesteps,
                                           image_latents, noise, mask_latents, masked_latents, num_inference_steps,
                                           repaint_jump_length, repaint_jump_n_sample, generator, progress)
        # 6. decode; 7. paste the original back outside the mask
        return self._decode_and_paste(latents, init_image, mask_condition, paste_back, feather, output_type)

    def _check_all_inputs(self, prompt, negative_prompt, num_images: int, num_inference_steps: int,
                          guidance_scale: float, height: int | None, width: int | None, output_type: str,
                          seed: int | None, scheduler, image, mask_image, mask, method: str | None, strength: float,
                          latent_mask: str, repaint_jump_length: int, repaint_jump_n_sample: int, paste_back: bool,
                          feather: float) -> tuple:
        """Every argument checked before any work, the inpainting ones first: (image, mask, method, prompts,
        negative prompts, height, width)."""
        if not (negative_prompt is None or isinstance(negative_prompt, (str, list, tuple))):
            raise UserError("the second positional argument of generate is negative_prompt, as in Pipeline.generate; "
                            "pass the image and mask by name: generate(prompt, image=..., mask_image=...)")
        image, mask_image, method = self.check_inpaint_inputs(image, _one_mask(mask_image, mask), method, strength,
                                                              scheduler, latent_mask, repaint_jump_length,
                                                              repaint_jump_n_sample, paste_back, feather)
        height, width = self.image_size(image, height, width)
        prompts, negative, height, width = self.check_inputs(prompt, negative_prompt, num_images, num_inference_steps,
                                                             guidance_scale, height, width, output_type, seed,
                                                             scheduler)
        return image, mask_image, method, prompts, negative, height, width

    def _denoise_per_method(self, method: str, latents: torch.Tensor, cond: torch.Tensor,
                            uncond: torch.Tensor | None, guidance_scale: float,
                            interval: tuple[float, float] | None, sampler: SchedulerMixin,
                            timesteps: torch.Tensor, image_latents: torch.Tensor | None, noise: torch.Tensor,
                            mask_latents: torch.Tensor, masked_latents: torch.Tensor, num_inference_steps: int,
                            repaint_jump_length: int, repaint_jump_n_sample: int, generator: torch.Generator | None,
                            progress: bool) -> torch.Tensor:
        """The guided sampling loop of `method`: the 9-channel U-Net's, RePaint's, or latent blending's."""
        if method == "unet":
            guide = None if self.guide_unet is None else self.inpaint_denoiser(mask_latents, masked_latents,
                                                                               self.guide_denoiser)
            guided = self.guidance(self.inpaint_denoiser(mask_latents, masked_latents), cond, uncond, guidance_scale,
                                   interval, guide)
            return self.denoise(latents, guided, sampler, generator, progress, timesteps)
        guided = self.guidance(self.denoiser, cond, uncond, guidance_scale, interval)
        if method == "repaint":
            return self.repaint(latents, guided, image_latents, mask_latents, num_inference_steps,
                                repaint_jump_length, repaint_jump_n_sample, generator, progress)
        return self.denoise_blending(latents, guided, sampler, timesteps, image_latents, noise, mask_latents,
                                     generator, progress)

    def _decode_and_paste(self, latents: torch.Tensor, init_image: torch.Tensor, mask_condition: torch.Tensor,
                          paste_back: bool, feather: float, output_type: str):
        """The latents as they are for output_type="latent"; else decoded, the original pasted back outside the
        mask (with `paste_back`), as `output_type`."""
        if output_type == "latent":
            return latents
        images = self.decode(latents, "torch")
        if paste_back:
            images = paste(images, (init_image + 1) / 2, mask_condition, feather)
        return self.decode_output(images, output_type)

    def check_inpaint_inputs(self, image, mask_image, method: str | None, strength: float,
                             scheduler: str | SchedulerMixin | None, latent_mask: str, repaint_jump_length: int,
                             repaint_jump_n_sample: int, paste_back: bool,
                             feather: float) -> tuple[object, object, str]:
        """The inpainting arguments, checked before any work: (image, mask, method), the ones given to the
        constructor by default, image and mask in the form the image processor reads (pipelines/arguments.py)."""
        image = self.image if image is None else image
        mask_image = self.mask_image if mask_image is None else mask_image
        if image is None or mask_image is None:
            raise UserError("inpainting needs an image and a mask: image=..., mask_image=... (white = repaint)")
        image, mask_image = image_input(image, "image"), mask_input(mask_image, "mask_image")
        method = self.check_method(method)
        real("strength", strength, 0, 1, low_open=True)
        real("feather", feather, 0, 64)
        if not isinstance(paste_back, bool):
            raise UserError(f"paste_back must be True or False, got {paste_back!r}")
        if method == "repaint" and (strength != 1 or scheduler is not None):
            raise UserError("method='repaint' samples with its own scheduler (RePaint's) from noise: leave scheduler "
                            "and strength out")
        if latent_mask not in LATENT_MASKS:
            raise UserError(f"unknown latent_mask '{latent_mask}'; valid: {', '.join(LATENT_MASKS)}")
        if latent_mask != "nearest" and method == "unet":
            raise UserError(f"latent_mask='{latent_mask}' is for method='blend' or 'repaint'; an inpainting U-Net "
                            "takes the mask as it was trained on it (nearest)")
        whole("repaint_jump_length", repaint_jump_length, 1)
        whole("repaint_jump_n_sample", repaint_jump_n_sample, 1)
        return image, mask_image, method

    def unchanged(self, init_image: torch.Tensor, batch: int, output_type: str):
        """What an empty mask returns: the image itself (its posterior-mean latents for output_type="latent")."""
        logger.warning("the mask is empty (no pixel >= 0.5): returning the image unchanged")
        if output_type == "latent":
            latents = self.vae.encode(init_image.to(self.unet.dtype)).latent_dist.mean
            return (latents * self.vae.config.scaling_factor).repeat(batch, 1, 1, 1)
        return self.decode_output(((init_image + 1) / 2).repeat(batch, 1, 1, 1), output_type)

    def check_method(self, method: str | None) -> str:
        if method is None:
            return "unet" if self.is_inpainting_unet else "blend"
        if method not in INPAINT_METHODS:
            raise UserError(f"unknown inpainting method '{method}'; valid: {', '.join(INPAINT_METHODS)}")
        if (method == "unet") != self.is_inpainting_unet:
            kind = "an inpainting" if self.is_inpainting_unet else "a text-to-image"
            fits = "'unet'" if self.is_inpainting_unet else "'blend' or 'repaint'"
            raise UserError(f"method='{method}' does not fit this model's U-Net ({kind} U-Net); use method={fits} "
                            "or leave it out")
        return method

    def prepare_image_and_mask(self, image, mask_image, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] (1, 3, H, W); mask binarised at 0.5 (1, 1, H, W); both resized (given as
        `check_inpaint_inputs` returns them)."""
        try:
            init_image = self.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
            mask_condition = self.mask_processor.preprocess(mask_image, height=height, width=width)
        except (ValueError, TypeError) as err:
            raise UserError(f"cannot read the image or mask ({err}); pass PIL images, numpy arrays or tensors") \
                from err
        if init_image.shape[0] != 1 or mask_condition.shape[0] != 1:
            raise UserError("pass one image and one mask (num_images makes several samples of it)")
        return init_image.to(self.device), mask_condition.to(self.device)

    def prepare_inpaint_latents(self, batch: int, height: int, width: int, generator: torch.Generator | None,
                                latents: torch.Tensor | None, sampler: SchedulerMixin, init_image: torch.Tensor,
                                timesteps: torch.Tensor, strength: float, need_image_latents: bool,
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(initial latents, their noise, the image's latents or None): pure noise at strength 1, else the image's
        latents noised to the first timestep kept."""
        shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        image_latents = None
        if need_image_latents:
            image_latents = self.encode_image(init_image, generator).repeat(batch, 1, 1, 1)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise UserError(f"latents have shape {tuple(latents.shape)}; expected {shape} for these settings")
            noise = latents.to(self.device, self.unet.dtype)
            return noise * sampler.init_noise_sigma, noise, image_latents
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        if strength == 1:
            return noise * sampler.init_noise_sigma, noise, image_latents
        return sampler.add_noise(image_latents, noise, timesteps[:1].repeat(batch)), noise, image_latents

    def prepare_mask_latents(self, mask_condition: torch.Tensor, init_image: torch.Tensor,
                             masked_image_latents: torch.Tensor | None, batch: int, generator: torch.Generator | None,
                             cover: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask at latent size and the masked image's latents (ldm/inpainting.py, as the fine-tune trains)."""
        size = (mask_condition.shape[-2] // self.vae_scale_factor, mask_condition.shape[-1] // self.vae_scale_factor)
        mask_latents = mask_at_latent_size(mask_condition, size, cover).to(self.unet.dtype)
        if masked_image_latents is None:
            masked_latents = encode_masked_image(self.vae, init_image.to(self.unet.dtype), mask_condition, generator)
        else:
            if tuple(masked_image_latents.shape[1:]) != (self.latent_channels, *size):
                raise UserError(f"masked_image_latents have shape {tuple(masked_image_latents.shape)}; expected "
                                f"(1, {self.latent_channels}, {size[0]}, {size[1]})")
            masked_latents = masked_image_latents.to(self.device, self.unet.dtype)
        return mask_latents.repeat(batch, 1, 1, 1), masked_latents.repeat(batch // masked_latents.shape[0], 1, 1, 1)

    def inpaint_denoiser(self, mask_latents: torch.Tensor, masked_latents: torch.Tensor, unet_denoiser=None):
        """The 9-channel U-Net (`unet_denoiser`: default the model's, or the guide's) as a denoiser of the noisy
        latents: mask and masked-image latents appended."""
        extra = unet_conditioning(mask_latents, masked_latents)
        unet_denoiser = unet_denoiser or self.denoiser

        def denoiser(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            copies = x.shape[0] // extra.shape[0]  # 2 when guidance batches both branches
            return unet_denoiser(torch.cat([x, extra.repeat(copies, 1, 1, 1)], dim=1), t, context)

        return denoiser

    def denoise_blending(self, latents: torch.Tensor, guided: ClassifierFreeGuidance, sampler: SchedulerMixin,
                         timesteps: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor,
                         mask_latents: torch.Tensor, generator: torch.Generator | None, progress: bool) -> torch.Tensor:
        """Latent blending (diffusers' 4-channel path): after step i the known region is replaced by the image's
        latents noised to the next timestep (the clean latents after the last step)."""
        def keep_known(i: int, x: torch.Tensor) -> torch.Tensor:
            known = image_latents
            if i < len(timesteps) - 1:
                known = sampler.add_noise(image_latents, noise, torch.tensor([timesteps[i + 1]]))
            return (1 - mask_latents) * known + mask_latents * x

        return self.denoise(latents, guided, sampler, generator, progress, timesteps, after_step=keep_known)

    def repaint(self, latents: torch.Tensor, guided: ClassifierFreeGuidance, image_latents: torch.Tensor,
                mask_latents: torch.Tensor, num_inference_steps: int, jump_length: int, jump_n_sample: int,
                generator: torch.Generator | None, progress: bool) -> torch.Tensor:
        """RePaint's loop (as diffusers' RePaintPipeline runs it): a step where the timestep goes down, an undo
        (forward noising) where it jumps back up."""
        config = self.scheduler.config
        if config.get("prediction_type", "epsilon") != "epsilon" or config.get("rescale_betas_zero_snr", False):
            raise UserError("method='repaint' needs an epsilon-prediction model without zero terminal SNR")
        sampler = RePaintScheduler.from_config(config)
        sampler.set_timesteps(num_inference_steps, jump_length, jump_n_sample, device=self.device)
        known = 1 - mask_latents
        last = sampler.timesteps[0] + 1
        for t in tqdm(sampler.timesteps, desc="RePaint", disable=not progress, leave=False):
            if t < last:
                output = guided(latents, t)[:, :latents.shape[1]]  # RePaint's step uses no learned variance
                latents = sampler.step(output, t, latents, image_latents, known, generator).prev_sample
            else:
                latents = sampler.undo_step(latents, last, generator)
            last = t
        return latents



def paste(generated: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, feather: float) -> torch.Tensor:
    """Original pixels outside the mask, generated inside; `feather` > 0 blurs the edge outwards by that radius."""
    weight = mask.float()
    if feather > 0:
        blurred = Image.fromarray((weight[0, 0].cpu().numpy() * 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(feather))
        soft = torch.from_numpy(np.asarray(blurred, dtype=np.float32) / 255).to(weight.device)
        weight = torch.maximum(weight, soft[None, None])
    return original * (1 - weight) + generated * weight


def _one_mask(mask_image, mask):
    if mask_image is not None and mask is not None:
        raise UserError("pass the mask once: mask_image=... or its alias mask=...")
    return mask_image if mask_image is not None else mask
