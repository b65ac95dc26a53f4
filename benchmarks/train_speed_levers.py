"""Training speed levers on this CPU for one U-Net preset: fp32 eager vs channels_last, bf16 autocast, torch.compile.

One process, the same U-Net weights, batch and inputs for every arm; arms are timed in alternation (round-robin) so
that machine noise falls on all of them alike. A step is forward + L_simple + backward + AdamW step, as in the
trainer. Compilation and the first steps are warm-up, reported separately.

    python benchmarks/train_speed_levers.py [--preset emoji-s] [--batch 32] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_step(unet, channels_last: bool, bf16: bool, compiled: bool, batch: int, generator_seed: int = 0):
    """A closure running one training step of its own copy of `unet` on fixed random inputs."""
    model = copy.deepcopy(unet).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(generator_seed)
    latents = torch.randn(batch, 4, 16, 16, generator=g)
    if channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    context = torch.randn(batch, 32, 384, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    noise = torch.randn(latents.shape, generator=g)

    def step() -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            prediction = forward(latents, timesteps, encoder_hidden_states=context).sample
        loss = (prediction.float() - noise).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="emoji-s")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per arm, taken in alternation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", default="fp32,channels_last,bf16,compile,compile+channels_last")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from ldm.unet import build_unet

    torch.manual_seed(0)
    unet = build_unet(args.preset, latent_size=16, latent_channels=4, cross_attention_dim=384)
    settings = {"fp32": (False, False, False), "channels_last": (True, False, False), "bf16": (False, True, False),
                "compile": (False, False, True), "compile+channels_last": (True, False, True),
                "compile+bf16": (False, True, True)}
    arms = {name: make_step(unet, *settings[name], args.batch) for name in args.arms.split(",")}
    warmup = {}
    for name, step in arms.items():
        started = time.perf_counter()
        for _ in range(args.warmup):
            step()
        warmup[name] = time.perf_counter() - started
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, step in arms.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["fp32"]) if "fp32" in times else None
    print(f"torch {torch.__version__}, {args.threads} threads, U-Net {args.preset} "
          f"({sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M), batch {args.batch}, 16x16x4 latents")
    print("| arm | s / step (median) | img/s | vs fp32 | warm-up s |\n|---|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"{base / median:.2f}x" if base else "-"
        print(f"| {name} | {median:.3f} | {args.batch / median:.1f} | {ratio} | {warmup[name]:.0f} |")


if __name__ == "__main__":
    main()
