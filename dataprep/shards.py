"""`ldm data shards`: an imagefolder or `datasets` dataset written as WebDataset tar shards.

Each example becomes KEY.<its image format> (the original file's bytes where there is one, else PNG), KEY.txt (the
caption) and KEY.json (every text column, so caption templates still find their fields); KEY is the row number.
Shards hold `rows_per_shard` rows each, the same cut the cache makes of the folder, so training from the shards and
from the folder sees the same rows in the same order. Written with webdataset's ShardWriter into a new folder that
appears only when complete.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm
from webdataset import ShardWriter

from core.data.dataset import load_image_caption_dataset
from core.errors import UserError
from core.files import atomic_folder, check_not_nested

def _image_member(value) -> tuple[str, bytes]:
    """(extension, bytes) of one image value as `datasets` gives it undecoded (path and/or bytes) or a PIL image."""
    if isinstance(value, dict):
        path = value.get("path") or ""
        suffix = Path(path).suffix.lower().lstrip(".")
        data = value.get("bytes") or (Path(path).read_bytes() if path else b"")
        if data and suffix in ("jpg", "jpeg", "png", "webp"):
            return suffix, data
        value = Image.open(io.BytesIO(data))
    buffer = io.BytesIO()
    value.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def write_shards(data: str, out: str | Path, split: str = "train", image_column: str = "image",
                 caption_column: str = "caption", rows_per_shard: int = 1000) -> dict:
    """Write `data`'s split as `out/00000.tar`, `out/00001.tar`, ...; returns a summary."""
    if rows_per_shard < 1:
        raise UserError(f"--rows-per-shard must be at least 1, got {rows_per_shard}")
    if Path(data).expanduser().exists():
        check_not_nested(Path(out), Path(data).expanduser())
    ds = load_image_caption_dataset(data, split, image_column, caption_column)
    with atomic_folder(out, what="shard folder") as tmp:
        with ShardWriter(str(tmp / "%05d.tar"), maxcount=rows_per_shard, verbose=0) as writer:
            for index, row in enumerate(tqdm(ds, desc="writing shards", unit="image")):
                extension, image = _image_member(row[image_column])
                texts = {k: v for k, v in row.items() if isinstance(v, str)}
                sample = {"__key__": f"{index:09d}", extension: image, "json": json.dumps(texts).encode()}
                if isinstance(row[caption_column], str):
                    sample["txt"] = row[caption_column].encode()
                writer.write(sample)
        shards = sorted(p.name for p in tmp.glob("*.tar"))
    last = len(shards) - 1
    return {"images": len(ds), "shards": len(shards), "folder": str(out),
            "data": f"{Path(out)}/{{00000..{last:05d}}}.tar" if last > 0 else f"{Path(out)}/00000.tar"}
