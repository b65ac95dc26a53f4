"""Data path at scale: memory, disk and speed of the sharded latent/text cache as the dataset grows.

Synthetic captioned shapes (unique captions, 32 px, WebDataset shards of 1,000 written on the fly) of each --sizes;
the tiny chain of configs/ldm/tiny.yaml (tiny autoencoder with random weights, MiniLM at text_max_length 16, the
tiny U-Net; the text encoder is most of the build's time on a CPU). For each size:
- `ldm cache` under `accelerate launch` with 1 and with 2 ranks, each in a fresh child: wall-clock images/s, peak RSS
  of the largest process (= one rank; getrusage over the child tree), cache bytes on disk per image;
- `train_ldm.py` from that cache (1 rank, batch 32, --train-steps steps): peak RSS.
Then, on the emoji-64 shape (kl-f4 autoencoder and emoji-s U-Net with random weights, MiniLM at 32, 64 px, batch 32,
2,048 images): training img/s reading the on-disk cache row by row (what train_ldm.py does) against the same rows held
in RAM (the previous in-memory cache's access pattern), same batches, alternating blocks of steps, median step time.

    python benchmarks/data_scaling.py [--sizes 10000,100000] [--work DIR] [--train-steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "ACCELERATE_USE_CPU": "1"}
MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
           "print('RESULT', r.returncode, time.perf_counter() - t, "
           "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def launch(ranks: int) -> list[str]:
    multi = ["--multi_gpu"] if ranks > 1 else []
    return [str(BIN / "accelerate"), "launch", *multi, "--num_processes", str(ranks), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def measured(command: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB of the largest process) of `command` run in a fresh child."""
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, "-c", MEASURE, *command], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=out, text=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    _, code, seconds, kilobytes = line.split()
    if code != "0":
        raise SystemExit(f"{' '.join(command)} failed; see {log}")
    return float(seconds), int(kilobytes) / 1024


def tiny_autoencoder(folder: Path, preset: str = "tiny", resolution: int = 32) -> Path:
    from autoencoder.model import build_autoencoder

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        build_autoencoder(preset, resolution=resolution).save_pretrained(folder)
    return folder


def shards(work: Path, images: int, size: int) -> str:
    from dataprep.synthetic import write_synthetic_shards

    folder = work / f"shapes-{images}-{size}px"
    if not folder.is_dir():
        write_synthetic_shards(folder, images, size=size, rows_per_shard=1000)
    return f"{folder}/*.tar"


def scaling_rows(work: Path, sizes: list[int], train_steps: int) -> list[dict]:
    autoencoder = tiny_autoencoder(work / "ae-tiny")
    rows = []
    for images in sizes:
        data = shards(work, images, 32)
        common = ["--config", "configs/ldm/tiny.yaml", f"data={data}", f"autoencoder={autoencoder}"]
        row = {"images": images}
        for ranks in (1, 2):
            cache_dir = work / f"cache-{images}-{ranks}rank"
            seconds, rss = measured(launch(ranks) + ["-m", "cli.main", "cache", *common,
                                                     f"output_dir={work / 'unused'}", f"cache_dir={cache_dir}"],
                                    work / f"cache-{images}-{ranks}.log")
            row[f"build_img_s_{ranks}"] = images / seconds
            row[f"build_rss_mb_{ranks}"] = rss
            row["disk_kb_per_image"] = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file()) / images / 1e3
            print(f"  {images} images, {ranks} rank(s): cache built in {seconds:.0f} s, peak RSS {rss:.0f} MB",
                  flush=True)
        out = work / f"train-{images}"
        seconds, rss = measured(launch(1) + ["train_ldm.py", *common, f"output_dir={out}", "batch_size=32",
                                             f"max_steps={train_steps}", f"checkpoint_every={train_steps}",
                                             "sample_every=100000", "resume=never",
                                             f"cache_dir={work / f'cache-{images}-1rank'}"],
                                work / f"train-{images}.log")
        row["train_rss_mb"] = rss
        print(f"  {images} images: {train_steps} training steps, peak RSS {rss:.0f} MB", flush=True)
        rows.append(row)
    return rows


def disk_vs_ram(work: Path, rounds: int, block: int = 8) -> dict:
    """Training img/s on the emoji-64 shape from the on-disk cache and from the same rows in RAM."""
    from cli.training_args import ldm_config
    from recipes.latent_diffusion import LDMTrainer

    autoencoder = tiny_autoencoder(work / "ae-kl-f4", "kl-f4", 64)
    config = ldm_config("configs/ldm/emoji-64.yaml", [f"data={shards(work, 2048, 64)}", f"autoencoder={autoencoder}",
                                                       f"output_dir={work / f'emoji64-{time.time_ns()}'}",
                                                       f"cache_dir={work / 'emoji64-cache'}", "resume=never",
                                                       'caption_templates=["{caption}"]', "log_every=100000"])
    trainer = LDMTrainer(config)
    trainer.setup()
    in_ram = [trainer.cache[i] for i in range(len(trainer.cache))]
    ram_loader = torch.utils.data.DataLoader(in_ram, batch_sampler=trainer.loader.batch_sampler,
                                             collate_fn=torch.utils.data.default_collate)
    times: dict[str, list[float]] = {"disk": [], "ram": []}
    iterators = {"disk": iter(trainer.loader), "ram": iter(ram_loader)}
    for arm in ("disk", "ram"):  # warm-up
        for _ in range(2):
            trainer.train_step(next(iterators[arm]))
    for round_ in range(rounds):
        for arm in ("disk", "ram") if round_ % 2 == 0 else ("ram", "disk"):  # each arm first in every other round
            for _ in range(block):
                start = time.perf_counter()
                try:
                    batch = next(iterators[arm])
                except StopIteration:
                    iterators[arm] = iter(trainer.loader if arm == "disk" else ram_loader)
                    batch = next(iterators[arm])
                trainer.train_step(batch)
                times[arm].append(time.perf_counter() - start)
    trainer.run_lock.release()
    batch = config.batch_size
    return {arm: batch / statistics.median(t) for arm, t in times.items()}


def print_scaling(rows: list[dict]) -> None:
    print("\n| images | cache build img/s, 1 rank | 2 ranks | speed-up | peak RSS per rank, build (1 / 2 ranks) | "
          "peak RSS, training | cache on disk per image |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']:,} | {r['build_img_s_1']:.0f} | {r['build_img_s_2']:.0f} | "
              f"{r['build_img_s_2'] / r['build_img_s_1']:.2f}x | {r['build_rss_mb_1']:.0f} / "
              f"{r['build_rss_mb_2']:.0f} MB | {r['train_rss_mb']:.0f} MB | {r['disk_kb_per_image']:.1f} KB |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        ratio = {k: last[k] / first[k] for k in ("build_rss_mb_1", "build_rss_mb_2", "train_rss_mb")}
        print(f"\nRSS at {last['images']:,} / at {first['images']:,}: build {ratio['build_rss_mb_1']:.2f}x (1 rank), "
              f"{ratio['build_rss_mb_2']:.2f}x (2 ranks); training {ratio['train_rss_mb']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="or 'none': only the disk vs RAM comparison")
    parser.add_argument("--work", default=None, help="folder for shards and caches (default: a new temporary one)")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="data-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; {os.cpu_count()} CPUs", flush=True)
    sizes = [] if args.sizes == "none" else [int(s) for s in args.sizes.split(",")]
    rows = scaling_rows(work, sizes, args.train_steps)
    speed = disk_vs_ram(work, args.rounds)
    if rows:
        print_scaling(rows)
    print(f"\nemoji-64 shape, batch 32: training from the on-disk cache {speed['disk']:.1f} img/s, from the same rows "
          f"in RAM {speed['ram']:.1f} img/s ({speed['disk'] / speed['ram']:.2f}x)")
    (work / "results.json").write_text(json.dumps({"scaling": rows, "disk_vs_ram": speed}, indent=1))


if __name__ == "__main__":
    main()
