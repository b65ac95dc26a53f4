"""Pack what a lent GPU machine needs and cannot fetch into .devcarry/ (git-ignored; carried beside the repo).

Such a machine (tools/gpu/README.md) has torch, transformers and accelerate, no network, and takes at most 64 MiB
with the repository. Packed here: the emoji train split as one xz-compressed uint8 array with its metadata (15 MB
instead of 44 MB of PNGs; PNGs are lossless, so unpacking gives the same pixels), the MiniLM text encoder in float16
pruned to the token ids that the captions, caption variants and sample prompts of both emoji configs use (23 MB
instead of 91 MB; tools/gpu/unpack.py fills every other token row with NaN, so a prompt outside that set makes NaN
losses instead of a silently wrong embedding), and the wheels of the packages that machine lacks.

Usage (repository root, data/emoji built): python tools/gpu/pack.py
"""

from __future__ import annotations

import json
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from core.data.dataset import format_captions  # noqa: E402
from ldm.text_encoders import minilm_path  # noqa: E402

CONFIGS = ("configs/ldm/emoji-64.yaml", "configs/ldm/emoji-64-inpaint.yaml")
WHEELS = ("diffusers==0.42.1", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "importlib_metadata==10.2.0",
          "webdataset==1.0.2", "braceexpand==0.1.7")
OUT = Path(".devcarry")


def pack_data(data: Path) -> list[dict]:
    rows = [json.loads(line) for line in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    pixels = np.stack([np.asarray(Image.open(data / "train" / r["file_name"]).convert("RGB")) for r in rows])
    (OUT / "emoji_train.u8.xz").write_bytes(lzma.compress(pixels.tobytes(), preset=6))
    (OUT / "metadata.jsonl.xz").write_bytes(lzma.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    for name in ("emoji_build.json", "ATTRIBUTION.md"):
        (OUT / name).write_bytes((data / name).read_bytes())
    return rows


def pack_text_encoder(rows: list[dict]) -> int:
    """The float16 MiniLM with only the used word-embedding rows; returns how many token ids are kept."""
    strings = {""}
    for path in CONFIGS:
        config = yaml.safe_load(Path(path).read_text())
        strings |= set(config["sample_prompts"])
        for row in rows:
            strings |= set(format_captions(row, "caption", tuple(config["caption_templates"])))
    source = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = sorted({i for s in strings for i in tokenizer(s)["input_ids"]} | set(tokenizer.all_special_ids))
    weights = load_file(source / "model.safetensors")
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    pruned = {k: v.half() for k, v in weights.items() if k != key}
    pruned["used_ids"], pruned["used_rows"] = torch.tensor(ids), weights[key][ids].half()
    save_file(pruned, OUT / "minilm_pruned.safetensors",
              metadata={"embedding_key": key, "vocab": str(weights[key].shape[0])})
    folder = OUT / "minilm"
    folder.mkdir(exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt"):
            (folder / f.name).write_bytes(f.read_bytes())
    return len(ids)


def download_wheels() -> None:
    """Python 3.12 wheels for the device machine (its python), without dependencies: it has the rest."""
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(OUT / "wheels"),
                    *WHEELS], check=True)


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    rows = pack_data(Path("data/emoji"))
    kept = pack_text_encoder(rows)
    download_wheels()
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"packed {len(rows)} images, MiniLM with {kept} token ids, wheels: {size / 2**20:.1f} MiB in {OUT}/")
