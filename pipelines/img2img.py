"""Image-to-image: `Img2ImgPipeline("a cat", image=photo).generate(strength=0.6)` (SDEdit, Meng et al. 2022).

The image is encoded, noised to the `strength` share of the sampler's steps and denoised under the prompt: strength
near 0 keeps the image, 1 keeps only its colours' faintest trace. Inputs, steps and random draws follow diffusers'
`StableDiffusionImg2ImgPipeline`, so for the same model folder, seed and settings both give the same pixels. Every
text-to-image model here takes it, adapters and guidance options included; `InpaintPipeline` builds on this class.
"""

from __future__ import annotations

import warnings

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from core.errors import UserError
from pipelines.arguments import image_input, image_size_of, real
from pipelines.text_to_image import Pipeline, images_to_pil

IMG2IMG_STRENGTH = 0.8  # diffusers' default


class Img2ImgPipeline(Pipeline):
    """Image-to-image with a trained text-to-image model: `Img2ImgPipeline(prompt, image=...)`, the image as PIL,
    numpy or torch (as diffusers takes it). No `model` = the embedded default."""

    def __init__(self, prompt: str | list[str] | None = None, model=None, *, image=None, **components) -> None:
        super().__init__(prompt, model, **components)  # a controlnet= is refused by load_controlnet below
        if self.is_flow:
            raise UserError(f"{self.model_name} is a flow-matching model (prediction_type=flow, a research arm): "
                            "image-to-image and inpainting take diffusion models here")
        self.image = image
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def load_controlnet(self, folder, force: bool = False) -> None:
        self.add_controlnet(None, {}, force)

    def add_controlnet(self, controlnet, info: dict, force: bool = False) -> None:
        raise UserError("ControlNets steer text-to-image sampling here (Pipeline(controlnet=...)); image-to-image "
                        "and inpainting with a ControlNet are not supported")

    @torch.inference_mode()
    def generate(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_images: int = 1, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 latents: torch.Tensor | None = None, scheduler: str | SchedulerMixin | None = None,
                 output_type: str = "pil", progress: bool = True, *, image=None, strength: float = IMG2IMG_STRENGTH,
                 guidance_interval: tuple[float, float] | str | None = "model",
                 step_schedule: str | None = "model"):
        """Redraw `image` under `prompt`; `Pipeline.generate`'s arguments in its order, then `image` and `strength`
        (in (0, 1]: the share of the `num_inference_steps` steps run, from the image noised to the first of them)
        by keyword. The image is resized to `height` x `width` (default: its own size). `latents`: the noise added
        to the image's latents, instead of drawing it."""
        # 1. check inputs
        num_inference_steps = self.default_steps() if num_inference_steps is None else num_inference_steps
        guidance_scale = self.default_guidance_scale() if guidance_scale is None else guidance_scale
        if not (negative_prompt is None or isinstance(negative_prompt, (str, list, tuple))):
            raise UserError("the second positional argument of generate is negative_prompt, as in Pipeline.generate; "
                            "pass the image by name: generate(prompt, image=...)")
        image = self.check_image(image)
        real("strength", strength, 0, 1, low_open=True)
        height, width = self.image_size(image, height, width)
        prompts, negative, height, width = self.check_inputs(prompt, negative_prompt, num_images, num_inference_steps,
                                                             guidance_scale, height, width, output_type, seed,
                                                             scheduler)
        interval = self.check_guidance(guidance_interval)
        if negative_prompt is not None and self.embeds_guidance:
            warnings.warn("a consistency student takes the guidance scale as an input and has no unconditional "
                          "branch: negative_prompt is ignored (as in diffusers)", stacklevel=3)
        sampler, timesteps = self.prepare_strength_scheduler(scheduler, num_inference_steps, strength, step_schedule)
        # 2. prepare the image, the prompt, the noised start
        init_image = self.preprocess_image(image, height, width)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        cond, uncond = self.encode_prompt(prompts, negative, num_images, guidance_scale)
        batch = len(prompts) * num_images
        image_latents = self.encode_image(init_image, generator).repeat(batch, 1, 1, 1)
        noise = self.prepare_noise(image_latents.shape, generator, latents)
        start = sampler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        # 3. denoise from there; 4. decode
        guided = self.guidance(self.denoiser, cond, uncond, guidance_scale, interval)
        return self.decode(self.denoise(start, guided, sampler, generator, progress, timesteps), output_type)

    def check_image(self, image):
        """The image to start from (the constructor's by default), in the form the image processor reads."""
        image = self.image if image is None else image
        if image is None:
            raise UserError("image-to-image needs an image: image=... (PIL, numpy or torch)")
        return image_input(image, "image")

    def image_size(self, image, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width): the given ones, else the image's own, which must fit the autoencoder's factor."""
        if height is not None and width is not None:
            return height, width
        image_height, image_width = image_size_of(image)
        factor = self.vae_scale_factor
        if image_height % factor or image_width % factor:
            raise UserError(f"the image is {image_width}x{image_height}; its sides must be multiples of the "
                            f"autoencoder's downsampling factor {factor}: pass height= and width= to resize it")
        return height or image_height, width or image_width

    def preprocess_image(self, image, height: int, width: int) -> torch.Tensor:
        """One image in [-1, 1], (1, 3, H, W), resized (given as `check_image` returns it)."""
        try:
            pixels = self.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        except (ValueError, TypeError) as err:
            raise UserError(f"cannot read the image ({err}); pass a PIL image, numpy array or tensor") from err
        if pixels.shape[0] != 1:
            raise UserError("pass one image (num_images makes several samples of it)")
        return pixels.to(self.device)

    def prepare_strength_scheduler(self, scheduler: str | SchedulerMixin | None, num_inference_steps: int,
                                   strength: float, step_schedule: str | None = "model"
                                   ) -> tuple[SchedulerMixin, torch.Tensor]:
        """The sampler and the last `strength` fraction of its timesteps (diffusers' img2img rule)."""
        sampler = self.prepare_scheduler(scheduler, num_inference_steps, step_schedule)
        t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        if num_inference_steps - t_start < 1:
            raise UserError(f"strength {strength} leaves no sampling step out of {num_inference_steps}; raise "
                            "strength or num_inference_steps")
        timesteps = sampler.timesteps[t_start * sampler.order:]
        if hasattr(sampler, "set_begin_index"):
            sampler.set_begin_index(t_start * sampler.order)
        return sampler, timesteps

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Scaled latents: a posterior sample, drawn from `generator` as diffusers draws it."""
        posterior = self.vae.encode(pixels.to(self.unet.dtype)).latent_dist
        return posterior.sample(generator) * self.vae.config.scaling_factor

    def prepare_noise(self, shape: torch.Size, generator: torch.Generator | None,
                      latents: torch.Tensor | None) -> torch.Tensor:
        """The noise added to the image's latents: drawn, or `latents` as given (checked)."""
        if latents is None:
            return randn_tensor(tuple(shape), generator=generator, device=self.device, dtype=self.unet.dtype)
        if tuple(latents.shape) != tuple(shape):
            raise UserError(f"latents have shape {tuple(latents.shape)}; expected {tuple(shape)} for these settings")
        return latents.to(self.device, self.unet.dtype)

    @staticmethod
    def decode_output(images: torch.Tensor, output_type: str):
        """[0, 1] images (B, 3, H, W) as `output_type` ("pil", "numpy" or "torch")."""
        if output_type == "torch":
            return images
        array = images.permute(0, 2, 3, 1).float().cpu().numpy()
        return array if output_type == "numpy" else images_to_pil(array)
