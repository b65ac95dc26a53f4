"""The data path at scale on a lent GPU machine (tools/gpu/README.md), in one short run; results to OUT/summary.md.

1. Synthetic captioned shapes (unique captions, 32 px JPEG) written there as WebDataset shards of 1,000, one shard
   per process on every core: nothing large travels.
2. `ldm cache` of them with the tiny chain (tiny autoencoder, tiny U-Net preset, a MiniLM-shaped text encoder with
   random weights at text_max_length 16: the carried MiniLM knows only the emoji captions' tokens): images/s, peak RSS.
3. `train_ldm.py` from the shards' cache for --train-minutes in bf16: img/s from its log.
4. benchmarks/train_throughput.py on the SD-1-sized U-Net (configs/ldm/sd-like.yaml's preset) at 256 px with a kl-f8
   autoencoder shape, bf16: our trainer against diffusers' train_text_to_image.py step, img/s and peak GPU memory.

    PYTHONPATH=$SITE python tools/gpu/data_at_scale.py OUT [--images 1000000] [--train-minutes 1]
CPU dry run here: python tools/gpu/data_at_scale.py runs/scale-dry --images 3000 --train-minutes 0.2 --cpu
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
           "sys.exit(r.returncode)")


def write_shard(job: tuple[Path, int, int, int]) -> int:
    """Shard `index` of the synthetic set: examples index*per .. (index+1)*per - 1."""
    import io

    from webdataset import TarWriter

    from dataprep.synthetic import synthetic_example

    folder, index, per, total = job
    with TarWriter(str(folder / f"{index:05d}.tar")) as writer:
        for i in range(index * per, min((index + 1) * per, total)):
            image, caption = synthetic_example(i, 32)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            writer.write({"__key__": f"{i:09d}", "jpg": buffer.getvalue(), "txt": caption.encode()})
    return index


def random_text_encoder(folder: Path) -> Path:
    """A MiniLM-shaped BERT with seeded random weights and MiniLM's full tokenizer (same cost as the real one)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from ldm.text_encoders import minilm_path

    source = ROOT / ".devcarry" / "minilm" if (ROOT / ".devcarry" / "minilm").is_dir() else minilm_path()
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(source)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def run(command: list[str], log: Path, env: dict) -> tuple[float, float]:
    """(seconds, peak RSS MB of the largest process) of `command`; its output in `log`."""
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, "-c", MEASURE, *command], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{text[-3000:]}")
    return seconds, float(re.findall(r"PEAK_RSS_MB ([\d.]+)", text)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--train-minutes", type=float, default=1.0)
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--sd-batch", type=int, default=32)
    parser.add_argument("--cpu", action="store_true", help="dry run on a CPU: tiny sizes, fp32, tiny U-Net step")
    args = parser.parse_args()
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TQDM_MININTERVAL": "10", "PYTHONUNBUFFERED": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no" if args.cpu else "bf16", "--dynamo_backend", "no"]
    lines = [f"# Data path at scale ({time.strftime('%Y-%m-%d')}), {args.images:,} synthetic 32 px images", ""]

    import torch

    from autoencoder.model import build_autoencoder

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines += [f"device: {device}; {os.cpu_count()} CPU cores; torch {torch.__version__}", ""]
    shards = work / "shards"
    shards.mkdir(exist_ok=True)
    start = time.perf_counter()
    count = (args.images + 999) // 1000
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(write_shard, [(shards, i, 1000, args.images) for i in range(count)])
    written = time.perf_counter() - start
    size = sum(p.stat().st_size for p in shards.glob("*.tar"))
    lines.append(f"- shards: {count} tars, {size / 1e9:.2f} GB, written in {written:.0f} s "
                 f"({args.images / written:,.0f} img/s on {os.cpu_count()} processes)")
    text = random_text_encoder(work / "text-encoder")
    torch.manual_seed(0)
    build_autoencoder("tiny", resolution=32).save_pretrained(work / "ae")
    common = ["--config", "configs/ldm/tiny.yaml", f"data={shards}/*.tar", f"autoencoder={work / 'ae'}",
              f"text_encoder={text}", f"cache_dir={work / 'cache'}"]
    workers = max(1, (os.cpu_count() or 2) - 2)  # decoding in loader processes; the GPU encodes
    seconds, rss = run(launch + ["-m", "cli.main", "cache", *common, f"output_dir={work / 'train'}",
                                 f"num_workers={0 if args.cpu else workers}"], out / "cache.log", env)
    disk = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file())
    lines.append(f"- `ldm cache`, 1 process: {seconds:.0f} s = {args.images / seconds:,.0f} img/s (decoding in "
                 f"{'the process' if args.cpu else f'{workers} loader workers'}, encoding on the "
                 f"{'CPU' if args.cpu else 'GPU'}); peak RSS of the largest process {rss:.0f} MB; "
                 f"{disk / args.images / 1e3:.1f} KB per image on disk")
    seconds, rss = run(launch + ["train_ldm.py", *common, f"output_dir={work / 'train'}", "resume=never",
                                 f"batch_size={args.train_batch}", f"max_minutes={args.train_minutes}",
                                 "max_steps=1000000", "sample_every=1000000", "checkpoint_every=1000000",
                                 "log_every=5"], out / "train.log", env)
    rates = re.findall(r"img_s=([\d.]+)", (out / "train.log").read_text())
    lines.append(f"- `train_ldm.py` from the cache, tiny U-Net, batch {args.train_batch}, "
                 f"{'fp32' if args.cpu else 'bf16'}: {rates[-1] if rates else '?'} img/s (last logged), "
                 f"peak RSS {rss:.0f} MB, {seconds:.0f} s in all")
    sd = (["--preset", "tiny", "--resolution", "32", "--vae-preset", "tiny", "--synthetic", "256", "--batch", "8"]
          if args.cpu else ["--preset", "sd-like", "--resolution", "256", "--vae-preset", "kl-f8", "--synthetic",
                            str(4 * args.sd_batch), "--batch", str(args.sd_batch), "--mixed-precision", "bf16"])
    result = subprocess.run([sys.executable, "benchmarks/train_throughput.py", *sd, "--steps", "6", "--warmup", "2",
                             "--repeats", "1", "--text-encoder", str(text)], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    (out / "throughput.log").write_text(result.stdout + result.stderr)
    lines += ["", "benchmarks/train_throughput.py " + " ".join(sd) + ":", "", result.stdout.strip() or
              f"failed:\n{result.stderr[-2000:]}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
