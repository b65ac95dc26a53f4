"""Autoencoder training throughput: the recipe's `train_step` vs a plain PyTorch loop, same model, same batch.

Both run L1 + KL on the same `AutoencoderKL` preset, batch and data, in one process, alternating blocks of steps;
the recipe adds what a serious run needs (Accelerate wrapping, non-finite checks on every rank, gradient clipping,
loss gathering). Extra rows time the recipe with the SSIM perceptual term and with the discriminator switched on.

    python benchmarks/autoencoder_throughput.py [--preset kl-f4] [--batch 16] [--steps 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="kl-f4")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from autoencoder.losses import autoencoder_loss
    from autoencoder.model import build_autoencoder
    from recipes.autoencoder import AutoencoderTrainConfig, AutoencoderTrainer
    from core.config import load_config
    from dataprep.emoji import build_emoji_dataset
    from core.accelerator import endless_batches

    workdir = Path(tempfile.mkdtemp(prefix="ae-throughput-"))
    build_emoji_dataset(workdir / "emoji", size=args.resolution, use_npm="no", limit=100)

    def recipe(name: str, *overrides: str):
        config = load_config(AutoencoderTrainConfig, None, [
            f"data={workdir / 'emoji'}", f"output_dir={workdir / name}", f"autoencoder_preset={args.preset}",
            f"resolution={args.resolution}", f"batch_size={args.batch}", *overrides])
        trainer = AutoencoderTrainer(config)
        trainer.setup()
        batches = endless_batches(trainer.accelerator, trainer.loader, 0)
        batch = next(batches)
        return lambda: trainer.train_step(batch)

    torch.manual_seed(0)
    vae = build_autoencoder(args.preset, args.resolution)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1

    def plain():
        posterior = vae.encode(images).latent_dist
        reconstructions = vae.decode(posterior.sample()).sample
        loss = autoencoder_loss(images, reconstructions, posterior.mean, posterior.logvar, 1e-6)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    candidates = {
        "plain loop (L1 + KL)": plain,
        "recipe (L1 + KL)": recipe("l1kl", "perceptual=none"),
        "recipe (L1 + KL + SSIM)": recipe("ssim", "perceptual=ssim"),
        "recipe (L1 + KL + SSIM + discriminator)": recipe("gan", "perceptual=ssim", "disc_start=0"),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    base = args.batch / statistics.median(times["plain loop (L1 + KL)"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset} at {args.resolution} px, "
          f"batch {args.batch}; median of {args.repeats} x {args.steps} steps")
    print("| loop | img/s | vs plain loop |\n|---|---|---|")
    for name, seconds in times.items():
        rate = args.batch / statistics.median(seconds)
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
