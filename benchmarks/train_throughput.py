"""Training throughput: this project's LDM trainer vs a minimal re-creation of diffusers' train_text_to_image.py step.

(a) ours: `LDMTrainer.train_step` with its defaults (latent + text-embedding cache, EMA) and any `--ours key=value`
    overrides (e.g. compile=true);
(b) reference: the step of diffusers' examples/text_to_image/train_text_to_image.py: encode the images with the VAE
    and the prompts with the text encoder every step, same U-Net, same batch, fp32, AdamW, EMA.
Same data, autoencoder shape (kl-f4, random weights: speed does not depend on them), U-Net preset and batch. Each
side runs in a fresh child process (so peak RSS is its own), twice, alternating; img/s is the median over the
timed steps after warm-up. FLOPs per image are counted with torch.utils.flop_counter over one full step
(after the timed ones); "setup + warm-up" is the one-off cost: cache building, compilation, first steps.

    python benchmarks/train_throughput.py [--preset emoji-l] [--batch 32] [--steps 8] [--ours compile=true]

`--levers` times our trainer alone under the CPU speed levers, each variant in its own child (alternating over
`--repeats`), against fp32 at `--batch`: bf16 autocast (Accelerate's mixed_precision=bf16, fp32 master weights),
channels_last U-Net and inputs, torch.compile (inductor), bf16 + compile, half / double the batch, AdamW's foreach
and fused kernels and the foreach EMA update (`--variants` picks some). Each row splits the step: the optimiser's
step and the EMA update, timed inside the step. "loss, step 1" is the first step's loss on the same seeded batch, "loss,
last step" the last timed one's (same numbers = same maths; bf16 and fused kernels may move them slightly).

    python benchmarks/train_throughput.py --levers --preset emoji-s [--batch 32]

On a GPU (tools/gpu/data_at_scale.sh): `--preset sd-like --resolution 256 --vae-preset kl-f8 --synthetic 2048
--mixed-precision bf16` runs both sides on synthetic shapes at 256 px (no emoji packages needed) in bf16 autocast and
adds each side's peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(workdir: Path, args) -> tuple[Path, Path]:
    """A 64 px emoji set (300 names, PyPI styles), or --synthetic N shapes at --resolution, and a randomly
    initialised autoencoder folder of --vae-preset."""
    from autoencoder.model import build_autoencoder
    from dataprep.emoji import build_emoji_dataset
    from dataprep.synthetic import write_synthetic_imagefolder

    data, vae_dir = workdir / "data", workdir / "vae"
    if args.synthetic:
        write_synthetic_imagefolder(data, args.synthetic, args.resolution)
    else:
        build_emoji_dataset(data, size=args.resolution, use_npm="no", limit=300)
    torch.manual_seed(0)
    vae = build_autoencoder(args.vae_preset, resolution=args.resolution)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(vae_dir)
    return data, vae_dir


def step_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def timed_steps(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def child_ours(args, data: Path, vae_dir: Path, out: Path) -> dict:
    from core.config import load_config
    from recipes.latent_diffusion import LDMTrainConfig, LDMTrainer
    from core.accelerator import endless_batches

    config = load_config(LDMTrainConfig, None, [
        f"data={data}", f"autoencoder={vae_dir}", f"output_dir={out}", f"unet_preset={args.preset}",
        f"batch_size={args.batch}", "text_max_length=32", "resume=never", f"resolution={args.resolution}",
        f"text_encoder={args.text_encoder}",
        *args.ours])
    trainer = LDMTrainer(config)
    start = time.perf_counter()
    trainer.setup()
    setup_seconds = time.perf_counter() - start
    batches = endless_batches(trainer.accelerator, trainer.loader, 0)
    if args.channels_last:  # the U-Net's weights and its input batches in NHWC
        trainer.model.to(memory_format=torch.channels_last)
        encode = trainer.encode_batch
        trainer.encode_batch = lambda batch: tuple(
            t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in encode(batch))
    losses = []
    parts = {"optimizer": [], "ema": []}  # seconds spent in the optimiser's step and the EMA update, per step

    def timed(fn, part: str):
        def wrapper(*a, **k):
            start = time.perf_counter()
            result = fn(*a, **k)
            parts[part].append(time.perf_counter() - start)
            return result
        return wrapper

    trainer.optimizer.step = timed(trainer.optimizer.step, "optimizer")
    if trainer.ema is not None:
        trainer.ema.step = timed(trainer.ema.step, "ema")

    def step():
        result = trainer.train_step(next(batches))
        losses.append(float(result["loss"]) if result else float("nan"))

    warmup = time.perf_counter()
    for _ in range(args.warmup):  # includes torch.compile's compilation when compile=true
        step()
    warmup_seconds = time.perf_counter() - warmup
    for values in parts.values():
        values.clear()
    times = timed_steps(step, args.steps)
    timed_parts = {f"{part}_seconds": list(values) for part, values in parts.items()}
    flops = step_flops(step) / args.batch
    return {"seconds": times, "flops_per_image": flops, "setup_seconds": setup_seconds + warmup_seconds,
            "first_loss": losses[0], "last_loss": losses[args.warmup + args.steps - 1], **timed_parts}


def child_reference(args, data: Path, vae_dir: Path, out: Path) -> dict:
    """diffusers train_text_to_image.py, the body of its training loop, with its defaults (fp32, no SNR gamma)."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from core.data.dataset import ImageCaptionDataset, SkippingCollate, load_image_caption_dataset
    from ldm.text_encoders import load_text_encoder
    from ldm.unet import build_unet

    accelerator = Accelerator()
    torch.manual_seed(0)
    noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    encoder = load_text_encoder(args.text_encoder, max_length=32)
    tokenizer, text_encoder = encoder.tokenizer, encoder.model
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(args.preset, args.resolution // factor, 4, text_encoder.config.hidden_size)
    unet.train()
    ema_unet = EMAModel(unet.parameters(), model_cls=type(unet), model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    collate = SkippingCollate()
    loader = torch.utils.data.DataLoader(ImageCaptionDataset(load_image_caption_dataset(str(data)), args.resolution),
                                         batch_size=args.batch, shuffle=True, drop_last=True, collate_fn=collate)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    iterator = iter(loader)

    def step():
        nonlocal iterator
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        # one caption per image, as that script has (our loader yields each image's caption variants)
        captions = [variants[0] for variants in batch["captions"]]
        input_ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids  # done in the dataset transform there
        input_ids = input_ids.to(accelerator.device)
        with accelerator.accumulate(unet):
            latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema_unet.step(unet.parameters())

    warmup = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_seconds = time.perf_counter() - warmup
    times = timed_steps(step, args.steps)
    flops = step_flops(step) / args.batch
    return {"seconds": times, "flops_per_image": flops, "setup_seconds": warmup_seconds}


def run_child(side: str, args, data: Path, vae_dir: Path, workdir: Path, attempt: int, batch: int | None = None,
              ours: list[str] | None = None, channels_last: bool = False, env: dict | None = None) -> dict:
    out = workdir / f"{side}-{attempt}-{len(list(workdir.iterdir()))}"
    ours = args.ours if ours is None else ours
    command = [sys.executable, __file__, "--child", side, "--data", str(data), "--vae", str(vae_dir),
               "--out", str(out), "--preset", args.preset, "--batch", str(batch or args.batch),
               "--resolution", str(args.resolution), "--vae-preset", args.vae_preset, "--text-encoder",
               args.text_encoder,
               "--steps", str(args.steps), "--warmup", str(args.warmup), *sum((["--ours", o] for o in ours), []),
               *(["--channels-last"] if channels_last else [])]
    precision = {"ACCELERATE_MIXED_PRECISION": args.mixed_precision} if args.mixed_precision != "no" else {}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, **precision, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"{side} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def levers(args, data: Path, vae_dir: Path, workdir: Path) -> None:
    """Our trainer per speed lever, one child per variant and repeat: img/s against fp32 at the same batch."""
    bf16 = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    variants = {  # name: (batch, config overrides, channels_last, environment)
        "fp32": (args.batch, [], False, {}),
        "bf16 autocast": (args.batch, [], False, bf16),
        "channels_last": (args.batch, [], True, {}),
        "compile": (args.batch, ["compile=true"], False, {}),
        "bf16 + compile": (args.batch, ["compile=true"], False, bf16),
        f"batch {args.batch // 2}": (args.batch // 2, [], False, {}),
        f"batch {args.batch * 2}": (args.batch * 2, [], False, {}),
        "AdamW foreach": (args.batch, ["adam_implementation=foreach"], False, {}),
        "AdamW fused": (args.batch, ["adam_implementation=fused"], False, {}),
        "EMA foreach": (args.batch, ["ema_foreach=true"], False, {}),
        "AdamW fused + EMA foreach": (args.batch, ["adam_implementation=fused", "ema_foreach=true"], False, {}),
    }
    if args.variants:
        chosen = ["fp32", *(v.strip() for v in args.variants.split(",") if v.strip() and v.strip() != "fp32")]
        unknown = [v for v in chosen if v not in variants]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; valid: {', '.join(variants)}")
        variants = {name: variants[name] for name in chosen}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for attempt in range(args.repeats):
        for name, (batch, ours, channels_last, env) in variants.items():
            results[name].append(run_child("ours", args, data, vae_dir, workdir, attempt, batch, ours,
                                           channels_last, env))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; our trainer, U-Net {args.preset}, "
          f"64 px -> 16x16x4 (cached latents and text), AdamW, EMA; {args.repeats} x {args.steps} timed steps per "
          "variant after warm-up")
    print("| variant | batch | img/s | vs fp32 | step ms | optimiser ms | EMA ms | loss, step 1 | loss, last step | "
          "peak RSS MB | setup + warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rates = {name: variants[name][0] / statistics.median(s for r in runs for s in r["seconds"])
             for name, runs in results.items()}

    def ms(runs: list[dict], key: str) -> str:
        values = [s for r in runs for s in r.get(key, [])]
        return f"{1000 * statistics.median(values):.0f}" if values else "-"

    for name, runs in results.items():
        print(f"| {name} | {variants[name][0]} | {rates[name]:.1f} | {rates[name] / rates['fp32']:.2f} | "
              f"{ms(runs, 'seconds')} | {ms(runs, 'optimizer_seconds')} | {ms(runs, 'ema_seconds')} | "
              f"{runs[0]['first_loss']:.5f} | {runs[0]['last_loss']:.5f} | {max(r['peak_rss_mb'] for r in runs):.0f} | "
              f"{statistics.median(r['setup_seconds'] for r in runs):.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="emoji-l")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per child")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="children per side, alternating")
    parser.add_argument("--ours", action="append", default=[], metavar="key=value", help="trainer config override")
    parser.add_argument("--levers", action="store_true", help="time our trainer under the CPU speed levers (above)")
    parser.add_argument("--variants", default="", help="--levers: only these variants (comma-separated; fp32 always)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--vae-preset", default="kl-f4", help="autoencoder shape (random weights)")
    parser.add_argument("--text-encoder", default="minilm", help="both sides' text encoder (name or folder)")
    parser.add_argument("--synthetic", type=int, default=0, help="N synthetic shapes instead of the emoji set")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"),
                        help="Accelerate's autocast for both sides")
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--vae", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        fn = child_ours if args.child == "ours" else child_reference
        result = fn(args, Path(args.data), Path(args.vae), Path(args.out))
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        print(json.dumps(result))
        return

    workdir = Path(tempfile.mkdtemp(prefix="train-throughput-"))
    data, vae_dir = prepare(workdir, args)
    if args.levers:
        return levers(args, data, vae_dir, workdir)
    results: dict[str, list[dict]] = {"reference": [], "ours": []}
    for attempt in range(args.repeats):
        for side in results:
            results[side].append(run_child(side, args, data, vae_dir, workdir, attempt))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {device}; U-Net {args.preset}, batch {args.batch}, {args.resolution} px, "
          f"autoencoder {args.vae_preset}, {args.mixed_precision if args.mixed_precision != 'no' else 'fp32'}; "
          f"{args.repeats} x {args.steps} timed steps per side; ours overrides: {' '.join(args.ours) or 'none'}")
    print("| trainer | img/s | ratio | GFLOP/img (fwd+bwd) | achieved GFLOP/s | peak RSS MB | peak GPU MB | "
          "setup + warm-up s |")
    print("|---|---|---|---|---|---|---|---|")
    rates = {}
    for side, runs in results.items():
        seconds = [s for r in runs for s in r["seconds"]]
        rates[side] = args.batch / statistics.median(seconds)
    for side, runs in results.items():
        flops = runs[0]["flops_per_image"]
        print(f"| {side} | {rates[side]:.1f} | {rates[side] / rates['reference']:.2f} | {flops / 1e9:.2f} | "
              f"{flops * rates[side] / 1e9:.1f} | {max(r['peak_rss_mb'] for r in runs):.0f} | "
              f"{max(r.get('peak_gpu_mb', 0.0) for r in runs):.0f} | "
              f"{statistics.median(r['setup_seconds'] for r in runs):.1f} |")


if __name__ == "__main__":
    main()
