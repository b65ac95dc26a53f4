"""Autoencoder objective ablation at equal steps: L1 + KL, + perceptual (SSIM), + patch discriminator.

Trains each arm with the real command (`accelerate launch train_autoencoder.py`, the preset's other settings
unchanged), then scores the export with `ldm eval autoencoder`'s function on the validation split: PSNR, SSIM, rFID.
Arms whose `final/` already exists are scored, not retrained, if its saved config.yaml ran what this invocation asks
(steps, data, the arm's overrides); a stale arm stops the run with the difference named. The table's steps column is
read from each arm's saved config.

    python benchmarks/autoencoder_ablation.py --data data/emoji [--steps 2000] [--disc-start 1000] [--parallel 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = {  # name -> config overrides; {disc_start} is --disc-start
    "l1-kl": ["perceptual=none", "disc_start=-1"],
    "l1-kl-ssim": ["perceptual=ssim", "disc_start=-1"],
    "l1-kl-ssim-disc": ["perceptual=ssim", "disc_start={disc_start}"],
}


def saved_config(arm: Path):
    """The typed config an arm's export was trained with."""
    from core.config import load_config
    from recipes.autoencoder import AutoencoderTrainConfig

    return load_config(AutoencoderTrainConfig, arm / "final" / "config.yaml", validate=False)


def check_earlier_arm(arm: Path, wanted: dict) -> None:
    """Stop when an arm trained earlier ran other settings than this invocation asks (it would be mislabelled)."""
    config = saved_config(arm)
    differ = [f"{key}={getattr(config, key)!r} (asked {value!r})" for key, value in wanted.items()
              if getattr(config, key) != value]
    if differ:
        sys.exit(f"{arm} was trained with {', '.join(differ)}: pass another --out, or delete that arm to retrain it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="configs/autoencoder/kl-f4.yaml")
    parser.add_argument("--out", default="runs/ae-ablation")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--disc-start", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=2, help="arms trained at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per training process")
    parser.add_argument("--num-images", type=int, default=1000, help="validation images scored, at most")
    args = parser.parse_args()

    from core.config import parse_overrides
    from evaluation.autoencoder import evaluate_autoencoder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {name: {"max_steps": args.steps, "data": args.data,
                     **parse_overrides([item.format(disc_start=args.disc_start) for item in overrides])}
              for name, overrides in ARMS.items()}
    for name in ARMS:
        if (out / name / "final").is_dir():
            check_earlier_arm(out / name, wanted[name])
    pending = [name for name in ARMS if not (out / name / "final").is_dir()]
    seconds: dict[str, float] = {}
    running: list[tuple[str, subprocess.Popen, float, IO[str]]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            overrides = [item.format(disc_start=args.disc_start) for item in ARMS[name]]
            command = ["accelerate", "launch", "--num_cpu_threads_per_process", str(args.threads),
                       "train_autoencoder.py", "--config", args.config, f"output_dir={out / name}",
                       f"data={args.data}", f"max_steps={args.steps}", *overrides]
            log = open(out / f"{name}.log", "w")
            print("training", name, ":", " ".join(command), flush=True)
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), time.time(), log))
        time.sleep(5)
        for item in list(running):
            name, process, started, log = item
            if process.poll() is not None:
                running.remove(item)
                log.close()
                if process.returncode != 0:
                    sys.exit(f"arm {name} failed (exit {process.returncode}); see {out / f'{name}.log'}")
                seconds[name] = time.time() - started

    print(f"\n{args.steps} steps each (discriminator from step {args.disc_start}), config {args.config}\n")
    print("| arm | steps | PSNR dB | SSIM | rFID | FID real half vs half | N | train wall s |\n"
          "|---|---|---|---|---|---|---|---|")
    for name in ARMS:
        metrics = evaluate_autoencoder(str(out / name), args.data, out / name / "eval", num_images=args.num_images)
        wall = f"{seconds[name]:.0f}" if name in seconds else "(earlier run)"
        steps = saved_config(out / name).max_steps
        print(f"| {name} | {steps} | {metrics['psnr']:.2f} | {metrics['ssim']:.3f} | {metrics['rfid']:.1f} | "
              f"{metrics['rfid_floor_real_half_vs_half']:.1f} | {metrics['images']} | {wall} |", flush=True)


if __name__ == "__main__":
    main()
