"""Data path at scale: memory, disk and speed of the sharded latent/text cache as the dataset grows.

Synthetic captioned shapes (unique captions, 32 px, WebDataset shards of 1,000 written on the fly) of each --sizes;
the tiny chain of configs/ldm/tiny.yaml (tiny autoencoder with random weights, MiniLM at text_max_length 16, the
tiny U-Net; the text encoder is most of the build's time on a CPU). For each size:
- `ldm cache` under `accelerate launch` with 1 and with 2 ranks, each in a fresh child: wall-clock images/s, peak RSS
  of the largest process (= one rank; getrusage over the child tree), cache bytes on disk per image; at the first
  size also 1 rank with num_workers=1 (images decoded in a loader process), then both again;
- `train_ldm.py` from that cache (1 rank, batch 32) reading --train-share of the set's rows (whole batches; 1 = one
  epoch): peak RSS. A fixed share, so the rows a run touches grow with the data as the set does, and so would any
  memory that grows with the rows read (10% by default: one epoch of 100,000 takes too long on 2 cores).
Then the emoji-64 recipe as it runs (its six caption templates; kl-f4 autoencoder and emoji-s U-Net with random
weights, MiniLM at 32, 64 px, batch 32, 2,048 synthetic images whose JSON carries the templates' fields): training
img/s with the cache's rows read from RAM (the shards' tensors loaded whole, the previous cache's access pattern), from
disk with the files in the page cache (warm), from disk with them dropped from it before every step (cold,
posix_fadvise DONTNEED), and cold reading every caption variant's text states with its row (what the cache did
before the recipe read only the variant it draws); same batches, blocks of steps in rotating order: median step time,
median time of it spent reading the cache (the loader's batch and the text states encode_batch reads), bytes read from
storage per step. Last, the time to read one row (latents and one variant, or all six), warm and cold.

    python benchmarks/data_scaling.py [--sizes 10000,100000] [--work DIR] [--train-share 0.1] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

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


def shards(work: Path, images: int, size: int, fields: Callable[[int], dict[str, str]] | None = None) -> str:
    from dataprep.synthetic import write_synthetic_shards

    folder = work / f"shapes-{images}-{size}px{'-fields' if fields else ''}"
    if not folder.is_dir():
        write_synthetic_shards(folder, images, size=size, rows_per_shard=1000, fields=fields)
    return f"{folder}/*.tar"


def scaling_rows(work: Path, sizes: list[int], train_share: float) -> list[dict]:
    autoencoder = tiny_autoencoder(work / "ae-tiny")
    rows = []
    for n, images in enumerate(sizes):
        data = shards(work, images, 32)
        common = ["--config", "configs/ldm/tiny.yaml", f"data={data}", f"autoencoder={autoencoder}"]
        row = {"images": images}
        builds = [(1, 0, ""), (2, 0, "")]
        if n == 0:  # num_workers=1 against 0 (docs/data.md), each built twice, alternating
            builds += [(1, 1, ""), (1, 0, "_again"), (1, 1, "_again")]
        for ranks, workers, again in builds:
            name = f"{ranks}" + (f"_workers_{workers}" if workers else "") + again
            cache_dir = work / f"cache-{images}-{name}"
            seconds, rss = measured(launch(ranks) + ["-m", "cli.main", "cache", *common, f"num_workers={workers}",
                                                     f"output_dir={work / 'unused'}", f"cache_dir={cache_dir}"],
                                    work / f"cache-{images}-{name}.log")
            row[f"build_s_{name}"] = seconds
            row[f"build_img_s_{name}"] = images / seconds
            row[f"build_rss_mb_{name}"] = rss
            row["disk_kb_per_image"] = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file()) / images / 1e3
            print(f"  {images} images, {ranks} rank(s), num_workers={workers}: cache built in {seconds:.1f} s, "
                  f"peak RSS {rss:.0f} MB", flush=True)
        steps = max(1, round(train_share * (images // 32)))  # of the sampler's full batches of 32 per epoch
        out = work / f"train-{images}"
        seconds, rss = measured(launch(1) + ["train_ldm.py", *common, f"output_dir={out}", "batch_size=32",
                                             f"max_steps={steps}", f"checkpoint_every={steps}", "log_every=100",
                                             "sample_every=1000000", "resume=never",
                                             f"cache_dir={work / f'cache-{images}-1'}"],
                                work / f"train-{images}.log")
        row.update(train_rss_mb=rss, train_steps=steps, train_rows=steps * 32, train_s=seconds)
        print(f"  {images} images: {steps} training steps ({steps * 32} rows read) in {seconds:.0f} s, peak RSS "
              f"{rss:.0f} MB", flush=True)
        rows.append(row)
    return rows


def emoji_fields(index: int) -> dict[str, str]:
    """The text fields the emoji-64 templates name beyond the caption, unique per image as the caption is."""
    return {"style": ("flat", "3d", "outline", "color")[index % 4], "short_name": f"shape number {index}"}


class RowsInRAM:
    """A cache shard's tensors loaded whole, rows indexed in memory: the previous in-memory cache's access pattern."""

    def __init__(self, path: str) -> None:
        self.tensors = {name: t.clone() for name, t in load_file(path).items()}  # copies, not the file's mapping

    def row(self, name: str, index: int) -> torch.Tensor:
        return self.tensors[name][index]


class EveryVariant(torch.utils.data.Dataset):
    """The cache's rows with every caption variant's text states read too (the read pattern before the recipe read
    only the drawn one); the recipe still reads (then from the page cache) and uses one."""

    def __init__(self, cache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict:
        row = self.cache[i]
        ids = row["caption_ids"]
        return {**row, "text_states": self.cache.text_states(row["shard"].expand(len(ids)), ids)}


def storage_bytes() -> int:
    """Bytes this process has had read from storage (page-cache hits are not counted)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["read_bytes"])


def drop_from_page_cache(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_page_cache(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def disk_vs_ram(work: Path, rounds: int, block: int = 8) -> dict:
    """Training img/s of the emoji-64 recipe with its cache read from RAM, from disk warm and cold, and cold with every
    caption variant read; then the time to read one row."""
    from cli.training_args import ldm_config
    from recipes.latent_diffusion import LDMTrainer

    autoencoder = tiny_autoencoder(work / "ae-kl-f4", "kl-f4", 64)
    config = ldm_config("configs/ldm/emoji-64.yaml", [f"data={shards(work, 2048, 64, emoji_fields)}",
                                                       f"autoencoder={autoencoder}",
                                                       f"output_dir={work / f'emoji64-{time.time_ns()}'}",
                                                       f"cache_dir={work / 'emoji64-cache'}", "resume=never",
                                                       "log_every=100000"])
    trainer = LDMTrainer(config)
    trainer.setup()
    cache = trainer.cache
    on_disk = cache.files
    paths = [f.path for f in on_disk]
    in_ram = [RowsInRAM(p) for p in paths]
    every_variant = torch.utils.data.DataLoader(EveryVariant(cache), batch_sampler=trainer.loader.batch_sampler,
                                                collate_fn=torch.utils.data.default_collate)
    # arm: (loader, the cache's files, before the arm's block, before each of its steps); all untimed
    arms = {"RAM": (trainer.loader, in_ram, None, None),
            "disk, warm": (trainer.loader, on_disk, read_into_page_cache, None),
            "disk, cold": (trainer.loader, on_disk, None, drop_from_page_cache),
            "disk, cold, every variant read": (every_variant, on_disk, None, drop_from_page_cache)}
    iterators = {arm: iter(loader) for arm, (loader, *_) in arms.items()}
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    reading: dict[str, list[float]] = {arm: [] for arm in arms}  # of each step: the loader's batch + its text reads
    read: dict[str, list[int]] = {arm: [] for arm in arms}
    text_seconds = [0.0]
    text_states = cache.text_states

    def timed_text_states(*args) -> torch.Tensor:
        start = time.perf_counter()
        states = text_states(*args)
        text_seconds[0] += time.perf_counter() - start
        return states

    cache.text_states = timed_text_states

    def run_block(arm: str, steps: int, record: bool) -> None:
        loader, files, before_block, before_step = arms[arm]
        cache.files = files
        if before_block:
            before_block(paths)
        for _ in range(steps):
            if before_step:
                before_step(paths)
            start, storage = time.perf_counter(), storage_bytes()
            try:
                batch = next(iterators[arm])
            except StopIteration:
                iterators[arm] = iter(loader)
                batch = next(iterators[arm])
            loaded, text_seconds[0] = time.perf_counter() - start, 0.0
            trainer.train_step(batch)  # encode_batch reads the drawn variants' text states
            if record:
                times[arm].append(time.perf_counter() - start)
                reading[arm].append(loaded + text_seconds[0])
                read[arm].append(storage_bytes() - storage)

    names = list(arms)
    for arm in names:  # warm-up
        run_block(arm, 2, record=False)
    for round_ in range(rounds):
        for arm in names[round_ % len(names):] + names[:round_ % len(names)]:  # each arm in each place in turn
            run_block(arm, block, record=True)
    cache.files, cache.text_states = on_disk, text_states
    trainer.run_lock.release()
    result = {arm: {"img_s": config.batch_size / statistics.median(times[arm]),
                    "reading_ms_per_step": statistics.median(reading[arm]) * 1e3,
                    "step_ms": statistics.median(times[arm]) * 1e3,
                    "storage_mb_per_step": statistics.mean(read[arm]) / 1e6} for arm in arms}

    def row_read_us(variants: str, cold: bool, count: int = 1000) -> float:
        """Microseconds to read one row: its latents and the first (or every) caption variant's text states."""
        total = 0.0
        read_into_page_cache(paths)
        for i in random.Random(0).sample(range(len(cache)), count):
            if cold:
                drop_from_page_cache(paths)
            start = time.perf_counter()
            row = cache[i]
            ids = row["caption_ids"] if variants == "every" else row["caption_ids"][:1]
            cache.text_states(row["shard"].expand(len(ids)), ids)
            total += time.perf_counter() - start
        return total / count * 1e6

    result["row_read_us"] = {f"{variants}, {'cold' if cold else 'warm'}": row_read_us(variants, cold)
                             for variants in ("one", "every") for cold in (False, True)}
    result["variants"] = len(config.caption_templates)
    return result


def print_scaling(rows: list[dict]) -> None:
    print("\n| images | cache build img/s, 1 rank | 2 ranks | speed-up | peak RSS per rank, build (1 / 2 ranks) | "
          "training: steps of 32 (share of the rows) | peak RSS, training | cache on disk per image |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']:,} | {r['build_img_s_1']:.0f} | {r['build_img_s_2']:.0f} | "
              f"{r['build_img_s_2'] / r['build_img_s_1']:.2f}x | {r['build_rss_mb_1']:.0f} / "
              f"{r['build_rss_mb_2']:.0f} MB | {r['train_steps']:,} ({r['train_rows'] / r['images']:.0%}) | "
              f"{r['train_rss_mb']:.0f} MB | {r['disk_kb_per_image']:.1f} KB |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        ratio = {k: last[k] / first[k] for k in ("build_rss_mb_1", "build_rss_mb_2", "train_rss_mb", "train_rows")}
        print(f"\nRSS at {last['images']:,} / at {first['images']:,}: build {ratio['build_rss_mb_1']:.2f}x (1 rank), "
              f"{ratio['build_rss_mb_2']:.2f}x (2 ranks); training {ratio['train_rss_mb']:.2f}x after "
              f"{ratio['train_rows']:.1f}x the rows read")
    first = rows[0]
    print(f"Cache build of {first['images']:,} images, 1 rank, twice each, alternating: {first['build_s_1']:.1f} / "
          f"{first['build_s_1_again']:.1f} s with num_workers=0, {first['build_s_1_workers_1']:.1f} / "
          f"{first['build_s_1_workers_1_again']:.1f} s with num_workers=1")


def print_disk_vs_ram(speed: dict) -> None:
    print(f"\nemoji-64 recipe ({speed['variants']} caption variants), batch 32, training read from:\n")
    print("| cache read from | img/s | vs RAM | step, ms | reading the cache, ms | MB read from storage per step |")
    print("|---|---:|---:|---:|---:|---:|")
    ram = speed["RAM"]["img_s"]
    for arm, r in speed.items():
        if isinstance(r, dict) and "img_s" in r:
            print(f"| {arm} | {r['img_s']:.1f} | {r['img_s'] / ram:.2f}x | {r['step_ms']:.0f} | "
                  f"{r['reading_ms_per_step']:.1f} | {r['storage_mb_per_step']:.1f} |")
    reads = speed["row_read_us"]
    print("\nReading one row (latents and text states), 1,000 random rows: one variant "
          f"{reads['one, warm']:.0f} us warm, {reads['one, cold']:.0f} us cold; all {speed['variants']} variants "
          f"{reads['every, warm']:.0f} us warm, {reads['every, cold']:.0f} us cold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="or 'none': only the disk vs RAM comparison")
    parser.add_argument("--work", default=None, help="folder for shards and caches (default: a new temporary one)")
    parser.add_argument("--train-share", type=float, default=0.1, help="share of each set's rows training reads")
    parser.add_argument("--rounds", type=int, default=4, help="blocks of 8 steps per arm (4: each arm once per place)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="data-scaling-")).resolve()  # children run in the repo root
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; {os.cpu_count()} CPUs", flush=True)
    sizes = [] if args.sizes == "none" else [int(s) for s in args.sizes.split(",")]
    start = time.perf_counter()
    rows = scaling_rows(work, sizes, args.train_share)
    speed = disk_vs_ram(work, args.rounds)
    if rows:
        print_scaling(rows)
    print_disk_vs_ram(speed)
    print(f"\n{(time.perf_counter() - start) / 60:.0f} minutes")
    (work / "results.json").write_text(json.dumps({"scaling": rows, "disk_vs_ram": speed}, indent=1))


if __name__ == "__main__":
    main()
