"""What each `ldm` subcommand does (cli/main.py parses the arguments): heavy imports happen inside each command, so
`ldm --help` and argument mistakes stay fast."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from core.errors import UserError


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "unconditional"


def cmd_data_emoji(args: argparse.Namespace) -> None:
    from dataprep.emoji import build_emoji_dataset

    summary = build_emoji_dataset(args.out, size=args.size, val_fraction=args.val_fraction, use_npm=args.npm,
                                  limit=args.limit)
    print(json.dumps(summary, indent=2))
    print(f"wrote {sum(summary['images'].values())} images to {args.out}")


def cmd_data_shards(args: argparse.Namespace) -> None:
    from dataprep.shards import write_shards

    summary = write_shards(args.data, args.out, args.split, args.image_column, args.caption_column,
                           args.rows_per_shard)
    print(f"wrote {summary['images']} images in {summary['shards']} shards; train with data={summary['data']}")


def cmd_cache(args: argparse.Namespace) -> None:
    """The cache training with this config would build, built now (one build serves many runs)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from cli.training_args import ldm_config, trainer_for
    from core.accelerator import setup_logging

    config = ldm_config(args.config, args.overrides)
    if not config.cache_latents:
        raise UserError("this config has cache_latents=false: it trains without a cache")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator reads it
    setup_logging(state)
    cache = trainer_for(config).build_cache(state)
    if state.is_main_process:
        print(f"cache {cache.folder}: {len(cache)} images in {len(cache.files)} shards, buckets {cache.buckets}"
              + (f"; skipped {dict(cache.skipped)}" if cache.skipped else ""))


def cmd_show_masks(args: argparse.Namespace) -> None:
    """A grid of sampled training masks over real images: what the inpainting fine-tune will see."""
    import numpy as np
    from PIL import Image

    from core.config import load_config
    from core.data.dataset import ImageCaptionDataset, load_image_caption_dataset
    from core.images import make_grid, tensor_to_pil
    from recipes.inpainting import InpaintTrainConfig

    # the config's mask_* settings, typed and checked like training reads them (nothing else is needed here)
    settings = load_config(InpaintTrainConfig, args.config, validate=False)
    data = ImageCaptionDataset(load_image_caption_dataset(args.data, args.split), args.size)
    masks = settings.mask_generator(args.size)
    rng = np.random.default_rng(args.seed)
    tiles = []
    for index in rng.permutation(len(data))[:args.num_images].tolist():
        row = data[index]
        if row is None:
            continue
        image = tensor_to_pil(row["pixel_values"][None])[0]
        mask = Image.fromarray((masks(rng) * 255).astype(np.uint8))
        tiles.append(Image.composite(Image.new("RGB", image.size, (255, 0, 255)), image, mask))
    out = Path(args.out)
    make_grid(tiles, columns=min(8, len(tiles))).save(out)
    print(f"wrote {out}: {len(tiles)} images, masked part in magenta (weights {masks.weights}, full mask "
          f"probability {masks.full_probability})")


def _output_path(args: argparse.Namespace) -> Path:
    out = Path(args.output or f"{_slug(args.prompt)}.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"output file {out} must end in .png")
    if not out.parent.exists():
        raise UserError(f"output folder {out.parent} does not exist")
    return out


def _write_images(images: list, out: Path) -> None:
    """One PNG (a grid for several images), written atomically."""
    from core.files import atomic_write
    from core.images import make_grid

    image = images[0] if len(images) == 1 else make_grid(images)
    atomic_write(out, lambda tmp: image.save(tmp, format="PNG"))
    print(f"wrote {out} ({len(images)} image{'s' * (len(images) > 1)}, {image.width}x{image.height})")


def _raise_limits(pipe, args: argparse.Namespace) -> None:
    """--max-images / --max-megapixels: the user raises the pipeline's limits on purpose (the total follows)."""
    limits = pipe.limits
    if args.max_images is not None:
        limits.max_images = args.max_images
    if args.max_megapixels is not None:
        limits.max_megapixels = args.max_megapixels
    if args.max_images is not None or args.max_megapixels is not None:  # and the total per call they imply
        limits.max_total_megapixels = max(limits.max_total_megapixels, limits.max_images * limits.max_megapixels)


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(negative_prompt=args.negative_prompt, num_images=args.num_images,
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                height=args.height, width=args.width, seed=args.seed, scheduler=args.scheduler,
                guidance_interval=_interval(args.guidance_interval, args.guide_every_step),
                step_schedule="model" if args.step_schedule is None else None if args.step_schedule == "none"
                else args.step_schedule)


def _interval(values: list[float] | None, every_step: bool):
    """--guidance-interval LO HI, --guide-every-step (None: every step), or neither: the model's own."""
    if values is not None and every_step:
        raise UserError("--guidance-interval and --guide-every-step contradict each other: pass one")
    return None if every_step else "model" if values is None else tuple(values)


def _model_kwargs(args: argparse.Namespace) -> dict:
    """--lora / --lora-scale / --force (and --guide-model) as Pipeline's keyword arguments."""
    scales = args.lora_scale or [1.0]
    if args.lora_scale and not args.lora:
        raise UserError("--lora-scale needs an adapter: add --lora DIR")
    return {"lora": args.lora, "lora_scale": scales[0] if len(scales) == 1 else scales, "lora_force": args.force,
            "guide_model": args.guide_model}


def cmd_generate(args: argparse.Namespace) -> None:
    from pipelines import Pipeline

    out = _output_path(args)
    control = _control_kwargs(args)
    pipe = Pipeline(args.prompt, model=args.model, allow_pickle=args.allow_pickle, fast=args.fast,
                    controlnet=args.controlnet, controlnet_force=args.force, **_model_kwargs(args))
    if control:  # each image through its detector at the sample size, as training made its maps
        from ldm.control import control_input

        height, width = args.height or pipe.default_size(), args.width or pipe.default_size()
        maps = [control_input(image, kind, height, width) for image, kind in control.pop("inputs")]
        control["control_image"] = maps if len(maps) > 1 else maps[0]
    if args.fuse and pipe.adapters:
        pipe.fuse_lora()
    _raise_limits(pipe, args)
    classifier = {} if args.classifier is None else {"classifier": args.classifier, "class_label": args.class_label,
                                                     "classifier_scale": args.classifier_scale}
    _write_images(pipe.generate(**_sampling_kwargs(args), **classifier, **control), out)


def _control_kwargs(args: argparse.Namespace) -> dict:
    """--control images with the detector each takes ("inputs": (image, kind) pairs) and --controlnet-scale,
    checked against --controlnet before any model loads."""
    from core.images import open_image
    from pipelines.controlnet import recorded_control_type

    images, scales = args.control or [], args.controlnet_scale
    if not args.controlnet:
        if images or scales:
            raise UserError("--control and --controlnet-scale need a ControlNet: add --controlnet DIR")
        return {}
    if len(images) != len(args.controlnet):
        raise UserError(f"give one --control image per --controlnet ({len(args.controlnet)}), got {len(images)}")
    maps = [open_image(path, "--control") for path in images]
    for i, folder in enumerate(args.controlnet):
        recorded = recorded_control_type(folder)
        if args.control_type not in (None, "none") and recorded not in (None, args.control_type):
            raise UserError(f"ControlNet {folder} was trained on {recorded} maps, not {args.control_type}: leave "
                            "--control-type out (each ControlNet's own kind is used), or pass none for ready maps")
        maps[i] = (maps[i], args.control_type or recorded or "canny")
    scale = 1.0 if not scales else scales[0] if len(scales) == 1 else scales
    return {"inputs": maps, "controlnet_conditioning_scale": scale}


def cmd_img2img(args: argparse.Namespace) -> None:
    from core.images import open_image
    from pipelines import Img2ImgPipeline

    out = _output_path(args)
    image = open_image(args.image, "--image")
    pipe = Img2ImgPipeline(args.prompt, model=args.model, allow_pickle=args.allow_pickle, **_model_kwargs(args))
    if args.fuse and pipe.adapters:
        pipe.fuse_lora()
    _raise_limits(pipe, args)
    _write_images(pipe.generate(image=image, strength=args.strength, **_sampling_kwargs(args)), out)


def cmd_inpaint(args: argparse.Namespace) -> None:
    from core.images import open_image
    from pipelines import InpaintPipeline

    out = _output_path(args)
    image, mask = open_image(args.image, "--image"), open_image(args.mask, "--mask")
    pipe = InpaintPipeline(args.prompt, model=args.model, allow_pickle=args.allow_pickle, **_model_kwargs(args))
    if args.fuse and pipe.adapters:
        pipe.fuse_lora()
    _raise_limits(pipe, args)
    _write_images(pipe.generate(image=image, mask_image=mask, strength=args.strength, method=args.method,
                                repaint_jump_length=args.repaint_jump_length,
                                repaint_jump_n_sample=args.repaint_jump_n_sample, latent_mask=args.latent_mask,
                                paste_back=not args.no_paste_back, feather=args.feather, **_sampling_kwargs(args)),
                  out)


def cmd_serve(args: argparse.Namespace) -> None:
    from web.app import serve

    serve(args.model, args.inpaint_model, args.host, args.port, args.auth, args.lora_dir, args.fast_model,
          args.controlnet)


def cmd_eval_autoencoder(args: argparse.Namespace) -> None:
    from evaluation.autoencoder import evaluate_autoencoder, format_table

    out = args.out or str(Path(args.model) / "eval")
    metrics = evaluate_autoencoder(args.model, args.data, out, split=args.split, num_images=args.num_images,
                                   batch_size=args.batch_size, resolution=args.resolution, fid=not args.no_fid)
    print(format_table(metrics))
    print(f"wrote {out}/metrics.json and {out}/reconstructions.png")


def _sampler_list(text: str) -> tuple[tuple[str, int], ...]:
    """"ddim:50,dpm++:20" -> (("ddim", 50), ("dpm++", 20)); "none" -> ()."""
    if text == "none":
        return ()
    try:
        return tuple((name, int(steps)) for name, steps in (item.rsplit(":", 1) for item in text.split(",")))
    except ValueError as err:
        raise UserError(f"--samplers takes NAME:STEPS,... (e.g. ddim:50,dpm++:20) or none, got '{text}'") from err


def _scale_list(text: str, flag: str = "--guidance-scales") -> tuple[float, ...]:
    if text == "none":
        return ()
    try:
        return tuple(float(value) for value in text.split(","))
    except ValueError as err:
        raise UserError(f"{flag} takes numbers separated by commas (e.g. 1,3,5) or none, got '{text}'") from err


def cmd_eval_generate(args: argparse.Namespace) -> None:
    from pipelines import Pipeline
    from evaluation.generation import evaluate_generation, format_tables, plot_quality_vs_time
    from pipelines import defaults as D

    from evaluation.settings import parse_settings

    settings = parse_settings(args.settings)
    pipe = Pipeline(model=args.model, fast=args.fast, guide_model=args.guide_model)
    out = args.out or (str(Path(args.model) / "eval") if args.model else
                       "eval-default-fast-model" if args.fast else "eval-default-model")
    student = pipe.is_consistency_student
    samplers = (args.samplers or ",".join(f"lcm:{s}" for s in D.FAST_SAMPLER_SWEEP)) if student else args.samplers
    if pipe.is_flow and not samplers:  # a flow-matching model's sweep: its one sampler at the sweep's step counts
        samplers = ",".join(f"flow-euler:{s}" for s in (10, 20, 50))
    metrics = evaluate_generation(
        pipe, args.data, out, num_images=args.num_images, sweep_images=args.sweep_images,
        scheduler=args.scheduler or ("lcm" if student else "flow-euler" if pipe.is_flow else D.EVAL_SCHEDULER),
        num_inference_steps=args.num_inference_steps or (D.FAST_NUM_INFERENCE_STEPS if student
                                                         else D.EVAL_NUM_INFERENCE_STEPS),
        guidance_scale=args.guidance_scale,
        heldout_split=None if args.heldout_split == "none" else args.heldout_split,
        samplers=_sampler_list(samplers or ",".join(f"{n}:{s}" for n, s in D.SAMPLER_SWEEP)),
        guidance_scales=_scale_list(args.guidance_scales), seed=args.seed, batch_size=args.batch_size,
        cache_dir=args.cache_dir, full_rows=_sampler_list(args.full_rows), sampling_settings=settings,
        settings_heldout=args.settings_heldout)
    print(format_tables(metrics))
    if args.compare:
        models = {metrics["model_name"]: metrics}
        for folder in args.compare:
            try:
                other = json.loads((Path(folder) / "metrics.json").read_text())
            except (OSError, ValueError) as err:
                raise UserError(f"--compare {folder}: no readable metrics.json there ({err})") from err
            models[other.get("model_name", folder)] = other
        plot_quality_vs_time(models, Path(out) / "quality-vs-time.png")
    print(f"wrote {out}/metrics.json and its plots")


def cmd_eval_classifier_guidance(args: argparse.Namespace) -> None:
    from pipelines import Pipeline
    from evaluation.classifier_guidance import evaluate_classifier_guidance, format_table
    from ldm.classifier import load_classifier

    pipe, classifier = Pipeline(model=args.model), load_classifier(args.classifier)
    out = args.out or "eval-classifier-guidance"
    metrics = evaluate_classifier_guidance(
        pipe, classifier, args.data, out, scales=_scale_list(args.scales, "--scales"), num_images=args.num_images,
        scheduler=args.scheduler, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        seed=args.seed, batch_size=args.batch_size, cache_dir=args.cache_dir)
    print(format_table(metrics))
    print(f"wrote {out}/metrics.json, classifier_guidance.png and samples.png")


def cmd_eval_inpaint(args: argparse.Namespace) -> None:
    from pipelines import InpaintPipeline
    from evaluation.inpainting import evaluate_inpainting, format_table
    from pipelines.loading import DEFAULT_INPAINT_MODEL_DIR, DEFAULT_MODEL_DIR

    pipes = {}
    # default: the design's claim, the inpainting fine-tune against the text-to-image model it started from
    for model in args.model or [DEFAULT_INPAINT_MODEL_DIR, DEFAULT_MODEL_DIR]:
        pipe = InpaintPipeline(model=model)
        label = Path(model).name
        methods = ["unet"] if pipe.is_inpainting_unet else [m for m in args.baselines.split(",") if m]
        for method in methods:
            pipes[f"{label} {method}"] = (pipe, method)
    if not pipes:
        raise UserError("nothing to evaluate: give an inpainting --model, or --baselines for a text-to-image one")
    out = args.out or "eval-inpaint"
    metrics = evaluate_inpainting(pipes, args.data, out, split=args.split, num_images=args.num_images,
                                  num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                  seed=args.seed, kinds=tuple(args.masks.split(",")),
                                  masked_input=not args.original_input)
    print(format_table(metrics))
    print(f"wrote {out}/metrics.json and {out}/examples.png")


def cmd_eval_control(args: argparse.Namespace) -> None:
    from evaluation.control import evaluate_control, format_table
    from pipelines import Pipeline
    from pipelines.controlnet import control_scales

    try:
        scales = tuple(float(s) for s in args.scales.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--scales must be numbers separated by commas, got '{args.scales}'") from None
    if not scales:
        raise UserError("--scales is empty: give at least one conditioning scale, e.g. --scales 1")
    control_scales(list(scales), len(scales))  # finite, before any model loads
    base = Pipeline(model=args.model)
    pipe = Pipeline(model=args.model, controlnet=args.controlnet)
    out = args.out or "eval-control"
    metrics = evaluate_control(base, pipe, args.data, out, split=args.split, num_images=args.num_images,
                               scales=scales, num_inference_steps=args.num_inference_steps,
                               guidance_scale=args.guidance_scale, seed=args.seed)
    print(format_table(metrics))
    print(f"wrote {out}/metrics.json and {out}/examples.png")


def cmd_eval_vlb(args: argparse.Namespace) -> None:
    from evaluation.vlb import evaluate_vlb, format_table
    from pipelines import Pipeline
    from pipelines.loading import resolve_model_path

    training_config = _saved_training_config(resolve_model_path(args.model))
    out = args.out or "eval-vlb"
    metrics = evaluate_vlb(Pipeline(model=args.model), args.data, out, split=args.split,
                           num_images=args.num_images, timestep_stride=args.timestep_stride,
                           training_config=training_config, seed=args.seed)
    print(format_table(metrics))
    print(f"wrote {out}/metrics.json and {out}/vlb.png")


def _saved_training_config(model_folder: Path):
    """The typed training config saved beside a model (its config.yaml), or None when there is none."""
    from cli.training_args import ldm_config

    config_file = model_folder / "config.yaml"
    return ldm_config(config_file, validate=False) if config_file.is_file() else None


def swap_decoder(vae, path: str):
    """The autoencoder at `path` in place of `vae`, allowed only if it encodes identically (e.g. a decoder-only
    fine-tune): the U-Net was trained on `vae`'s latents."""
    from autoencoder.model import encodes_identically, load_autoencoder

    tuned = load_autoencoder(path)
    if not encodes_identically(vae, tuned):
        raise UserError(f"--vae {path} does not encode like the model's autoencoder (encoder weights or scaling "
                        "factor differ); only a decoder-only fine-tune of the same autoencoder can replace it")
    return tuned.eval().requires_grad_(False)


def cmd_ema(args: argparse.Namespace) -> None:
    """Post-hoc EMA: synthesise each --sigma-rel from the run's snapshots, score them by the run's validation loss
    when there are several, and write the lowest as a model folder (post_hoc_ema.json records the choice)."""
    import copy
    import json

    from cli.training_args import ldm_config
    from core.files import atomic_folder, check_not_nested
    from core.post_hoc_ema import SNAPSHOT_FOLDER, synthesize
    from pipelines import InpaintPipeline, Pipeline
    from pipelines.loading import is_model_folder, write_model_folder, write_sampling_defaults
    from recipes.consistency import DistillTrainConfig
    from recipes.inpainting import InpaintTrainConfig, InpaintTrainer
    from recipes.latent_diffusion import LDMTrainer

    run, out = Path(args.run), Path(args.out)
    config_file = run / "final" / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run} has no final/config.yaml: give a train_ldm.py output_dir whose run has exported "
                        "(at max_steps, or at max_minutes)")
    check_not_nested(out, run)
    config = ldm_config(config_file)
    if not config.post_hoc_ema or isinstance(config, DistillTrainConfig):
        raise UserError(f"{run} was trained without post_hoc_ema: train with post_hoc_ema=[0.05, 0.10] to choose the "
                        "EMA length afterwards")
    inpainting = isinstance(config, InpaintTrainConfig)
    pipe = (InpaintPipeline if inpainting else Pipeline)(model=run / "final")
    states = {sigma: synthesize(pipe.unet, run / SNAPSHOT_FOLDER, sigma)
              for sigma in dict.fromkeys(args.sigma_rel)}
    losses: dict[float, float] = {}
    if len(states) > 1:
        trainer = (InpaintTrainer if inpainting else LDMTrainer)(config)
        trainer.setup_scoring()
        if not trainer.validation_batches:
            raise UserError(f"{run}'s data has no held-out images to score EMA lengths by: give one --sigma-rel")
        for sigma, state in states.items():
            unet = copy.deepcopy(pipe.unet)
            unet.load_state_dict(state)
            losses[sigma] = trainer.validation_loss_of(unet.to(trainer.accelerator.device))[0]
            print(f"sigma_rel {sigma:g}: validation loss {losses[sigma]:.5f}")
    chosen = min(losses, key=losses.get) if losses else next(iter(states))
    pipe.unet.load_state_dict(states[chosen])
    with atomic_folder(out, args.overwrite, is_model_folder, "model folder") as tmp:
        write_model_folder(tmp, pipe.vae, pipe.text_encoder, pipe.unet, pipe.model_scheduler)
        write_sampling_defaults(tmp, pipe.sampling_defaults)
        (tmp / "config.yaml").write_bytes(config_file.read_bytes())
        record = {"run": str(run), "sigma_rel": chosen, "tracked": config.post_hoc_ema,
                  "validation_loss": {str(k): v for k, v in losses.items()}}
        (tmp / "post_hoc_ema.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} (post-hoc EMA, sigma_rel {chosen:g})")


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from pipelines import InpaintPipeline, Pipeline
    from core.files import check_not_nested
    from pipelines.loading import read_model_index, resolve_model_path, save_slim_model_folder

    path = resolve_model_path(args.model)  # a model folder, or a training output_dir (its final/)
    for source in {path, Path(args.model)}:  # never into (or around) what is being read, a training run included
        check_not_nested(Path(args.out), source)
    inpainting = read_model_index(path).get("_class_name") == "StableDiffusionInpaintPipeline"
    pipe = (InpaintPipeline if inpainting else Pipeline)(model=path)
    if args.vae is not None:
        pipe.vae = swap_decoder(pipe.vae, args.vae)
    config_file = path / "config.yaml"
    if args.text_encoder is None and not config_file.is_file():
        raise UserError(f"{path} has no config.yaml naming its text encoder; pass --text-encoder NAME")
    name = args.text_encoder or _saved_training_config(path).text_encoder
    if not name:
        raise UserError(f"{path}/config.yaml does not name its text encoder; pass --text-encoder NAME")
    folder = save_slim_model_folder(args.out, pipe.vae, pipe.unet, pipe.scheduler, name,
                                    pipe.text_encoder.max_length, getattr(torch, args.dtype), args.overwrite,
                                    config_file if config_file.is_file() else None, pipe.sampling_defaults)
    print(f"wrote {folder} (U-Net and autoencoder in {args.dtype}; text encoder '{name}' from its package)")
