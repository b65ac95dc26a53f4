"""Synthetic captioned shapes as WebDataset shards: data at any size for tests, benchmarks and the GPU script,
generated where it is used (nothing to download or carry). Every caption is unique (it ends with the image's
number), as in web-scale data, so the text cache cannot share states between images.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw
from webdataset import ShardWriter

from core.files import atomic_folder

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (150, 60, 190), "orange": (250, 140, 30), "black": (20, 20, 20), "white": (250, 250, 250)}
SHAPES = ("circle", "square", "triangle")


def synthetic_example(index: int, size: int, aspects: tuple[float, ...] = (1.0,)) -> tuple[Image.Image, str]:
    """Image `index` (a coloured shape on a coloured ground; width / height drawn from `aspects`) and its caption."""
    rng = random.Random(index)
    aspect = rng.choice(aspects)
    width, height = max(8, round(size * aspect ** 0.5)), max(8, round(size / aspect ** 0.5))
    (shape_colour, shape_rgb), (ground, ground_rgb) = rng.sample(sorted(COLOURS.items()), 2)
    shape = rng.choice(SHAPES)
    image = Image.new("RGB", (width, height), ground_rgb)
    draw = ImageDraw.Draw(image)
    side = rng.uniform(0.3, 0.7) * min(width, height)
    x, y = rng.uniform(0, width - side), rng.uniform(0, height - side)
    box = (x, y, x + side, y + side)
    if shape == "circle":
        draw.ellipse(box, fill=shape_rgb)
    elif shape == "square":
        draw.rectangle(box, fill=shape_rgb)
    else:
        draw.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=shape_rgb)
    return image, f"a {shape_colour} {shape} on {ground}, picture {index}"


def write_synthetic_shards(out: str | Path, images: int, size: int = 32, rows_per_shard: int = 1000,
                           aspects: tuple[float, ...] = (1.0,), image_format: str = "jpg",
                           fields: Callable[[int], dict[str, str]] | None = None) -> list[Path]:
    """`images` examples as `out/00000.tar`, ... (KEY.jpg or .png + KEY.txt, and KEY.json holding `fields(index)`,
    text fields that caption templates can name, when given); returns the shard paths."""
    out = Path(out)
    with atomic_folder(out, what="shard folder") as tmp:
        with ShardWriter(str(tmp / "%05d.tar"), maxcount=rows_per_shard, verbose=0) as writer:
            for index in range(images):
                image, caption = synthetic_example(index, size, aspects)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG" if image_format == "jpg" else "PNG", quality=90)
                sample = {"__key__": f"{index:09d}", image_format: buffer.getvalue(), "txt": caption.encode()}
                if fields is not None:
                    sample["json"] = json.dumps(fields(index)).encode()
                writer.write(sample)
    return sorted(out.glob("*.tar"))


def write_synthetic_imagefolder(out: str | Path, images: int, size: int = 64) -> Path:
    """`images` square examples as an imagefolder (`train/` with PNGs and metadata.jsonl), for code that reads one."""
    out = Path(out)
    with atomic_folder(out, what="synthetic imagefolder") as tmp:
        (tmp / "train").mkdir()
        lines = []
        for index in range(images):
            image, caption = synthetic_example(index, size)
            image.save(tmp / "train" / f"{index:07d}.png")
            lines.append(json.dumps({"file_name": f"{index:07d}.png", "caption": caption}))
        (tmp / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out
