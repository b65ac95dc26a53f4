"""Where training rows come from, as a list of shards read one row at a time (never the whole set in memory).

Three kinds of `data`:
- WebDataset tar shards (what img2dataset and `ldm data shards` write: KEY.jpg/png/webp + KEY.txt and/or KEY.json) by
  path, glob or brace range, e.g. `shards/{00000..00099}.tar`. Read with webdataset's tar iterators: they stream a
  tar member by member and hand each error to a handler, so a truncated tar costs its remainder, not the run.
- an imagefolder with metadata.jsonl or a saved `datasets` dataset: cut into shards of `rows_per_shard` rows (the
  same cut `ldm data shards` makes, so both give the same rows in the same order).
- any `datasets` dataset with `streaming=true`: its own shards (`IterableDataset.shard`), read as a stream.

A shard is the unit the cache builds, splits across ranks and resumes by. Rows that cannot be used (an image that does
not decode, no caption, an empty or non-UTF-8 caption, a broken tar) are skipped and counted per reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import torch
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import group_by_keys, tar_file_expander

from core.data.buckets import Bucketer
from core.data.tar_patterns import expand_tar_pattern, is_tar_pattern
from core.data.dataset import (format_captions, load_image_caption_dataset, pil_to_tensor, split_with_columns,
                               to_rgb)
from core.errors import UserError
from core.files import atomic_write
from core.locks import FileLock

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SETTLED_NS = 2_000_000_000  # a file changed this recently is read again next time, not remembered (file_digests)


@dataclass
class Row:
    """One raw example: its position in its shard, the encoded image (bytes, a PIL image or a datasets dict) and
    its text fields (the caption column among them); `None` fields mean the row was unusable for `reason`."""

    position: int
    image: Any
    fields: dict[str, str] | None
    reason: str = ""


@dataclass
class SourceShard:
    name: str
    rows: Callable[[Counter], Iterator[Row]]  # counts tar-level errors into the Counter it is given


@dataclass
class DataSource:
    shards: list[SourceShard]
    spec: dict  # what identifies the data (part of the cache key)
    caption_column: str
    files: list[Path] = field(default_factory=list)  # files the cache key identifies by their bytes (tar shards)

    def identity(self, record: Path | None = None) -> dict:
        """What the cache key holds of the data: `spec`, plus the SHA-256 of each file's bytes where it reads files
        (tar pads to 10,240-byte records, so an edited caption or image usually keeps a shard's size); `record`
        remembers them (file_digests)."""
        return {**self.spec, "sha256": file_digests(self.files, record)} if self.files else self.spec


def _decode_text(value: bytes) -> str | None:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _tar_ends_properly(path: Path) -> bool:
    """Whether the tar ends with its end-of-archive marker (two zero blocks): a cut-off copy or download does not,
    and Python's tarfile reads such a file up to the cut without an error."""
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def _tar_rows(path: Path, caption_column: str) -> Callable[[Counter], Iterator[Row]]:
    def rows(counts: Counter) -> Iterator[Row]:
        def handler(err: Exception) -> bool:  # webdataset's handler: count and go on with what is left
            counts["unreadable tar data"] += 1
            logger.warning("%s: %s: %s (rest of this shard skipped where unreadable)", path.name,
                           type(err).__name__, err)
            return True

        if not _tar_ends_properly(path):
            counts["truncated tar file"] += 1
            logger.warning("%s is truncated (no end-of-archive marker): reading the examples before the cut", path)
        with open(path, "rb") as stream:
            members = tar_file_expander([{"url": str(path), "stream": stream}], handler=handler)
            for position, sample in enumerate(group_by_keys(members, handler=handler)):
                image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
                if image is None:
                    yield Row(position, None, None, "no image member")
                    continue
                fields: dict[str, str] = {}
                if "json" in sample:
                    try:
                        meta = json.loads(sample["json"].decode("utf-8"))
                    except ValueError:  # UnicodeDecodeError is one
                        yield Row(position, None, None, "unreadable json")
                        continue
                    if isinstance(meta, dict):
                        fields.update({k: v for k, v in meta.items() if isinstance(v, str)})
                if "txt" in sample:
                    text = _decode_text(sample["txt"])
                    if text is None:
                        yield Row(position, None, None, "non-UTF-8 caption")
                        continue
                    fields.setdefault(caption_column, text.strip())
                yield Row(position, image, fields)
    return rows


def _dataset_rows(ds, image_column: str, start: int = 0) -> Callable[[Counter], Iterator[Row]]:
    def rows(counts: Counter) -> Iterator[Row]:
        for position, row in enumerate(ds, start=start):
            yield Row(position, row[image_column], {k: v for k, v in row.items() if isinstance(v, str)})
    return rows


def open_source(data: str, split: str = "train", image_column: str = "image", caption_column: str = "caption",
                streaming: bool = False, rows_per_shard: int = 1000) -> DataSource:
    """The shards of `data` (see the module docstring for the three kinds)."""
    if rows_per_shard < 1:
        raise UserError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    if is_tar_pattern(data):
        paths = expand_tar_pattern(data)
        spec = {"kind": "webdataset", "caption_column": caption_column, "shards": [p.name for p in paths]}
        return DataSource([SourceShard(p.name, _tar_rows(p, caption_column)) for p in paths], spec, caption_column,
                          paths)
    if streaming:
        return _streaming_source(data, split, image_column, caption_column)
    ds = load_image_caption_dataset(data, split, image_column, caption_column)
    shards = [SourceShard(f"rows-{start:09d}", _dataset_rows(ds.select(range(start, min(start + rows_per_shard,
                                                                                         len(ds)))),
                                                             image_column, start))
              for start in range(0, len(ds), rows_per_shard)]
    spec = {"kind": "dataset", "fingerprint": ds._fingerprint, "rows": len(ds), "rows_per_shard": rows_per_shard,
            "image_column": image_column, "caption_column": caption_column}
    return DataSource(shards, spec, caption_column)


def _files_signature(path: Path) -> str:
    """A hash of every file's relative name, size and modification time under `path`: a changed file changes it."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{stat.st_size}:{stat.st_mtime_ns}\n"
                      .encode())
    return digest.hexdigest()


def _file_version(stat: os.stat_result) -> list[int]:
    """What tells one version of a file from another without reading it."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _sha256(path: Path) -> tuple[str, os.stat_result]:
    """The SHA-256 of the file's bytes, streamed, and the version it was read at; one line if it changed meanwhile."""
    before, digest = path.stat(), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if _file_version(path.stat()) != _file_version(before):
        raise UserError(f"{path} changed while it was being read; run again once it is written")
    return digest.hexdigest(), before


def _read_record(record: Path) -> dict:
    """The remembered digests (resolved path -> version and sha256); an unreadable record is only a lost memo."""
    try:
        entries = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _remembered(entries: dict, paths: list[Path]) -> list[str | None]:
    """Each file's recorded digest where its version is the recorded one, else None."""
    found = []
    for path in paths:
        entry = entries.get(str(path.resolve()))
        same = isinstance(entry, dict) and entry.get("version") == _file_version(path.stat())
        found.append(entry.get("sha256") if same else None)
    return found


def file_digests(paths: list[Path], record: Path | None = None) -> list[str]:
    """The SHA-256 of each file's bytes. With `record` (a JSON file beside the cache), a digest is remembered under
    the file's resolved path and version (size, mtime_ns, ctime_ns, inode) and reused only while all four are the
    same, so a shard is read once per version, not on every run; processes sharing the record take turns, so one
    reads. A rewrite changes mtime and ctime, and ctime cannot be set back (touch -d or cp -p restore only mtime),
    so even an edit that keeps the size and restores the mtime is read again; only resetting the clock would hide
    one. A file changed within SETTLED_NS of being read is not remembered: an edit in the same timestamp tick could
    leave all four as they were."""
    if record is None:
        return [_sha256(path)[0] for path in paths]
    digests = _remembered(_read_record(record), paths)
    if None not in digests:
        return digests
    record.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(record.with_name(f".{record.name}.lock"), f"the shard digests in {record}", wait=float("inf")):
        entries = _read_record(record)  # another process may have read some meanwhile
        digests = _remembered(entries, paths)
        missing = [i for i, digest in enumerate(digests) if digest is None]
        if not missing:
            return digests
        logger.info("reading %d tar shards (%.1f GB) once for the cache key (remembered in %s)", len(missing),
                    sum(paths[i].stat().st_size for i in missing) / 1e9, record)
        for i in missing:
            digests[i], stat = _sha256(paths[i])
            if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > SETTLED_NS:
                entries[str(paths[i].resolve())] = {"version": _file_version(stat), "sha256": digests[i]}
        atomic_write(record, lambda tmp: tmp.write_text(json.dumps(entries, indent=1) + "\n"))
    return digests


def _streaming_source(data: str, split: str, image_column: str, caption_column: str) -> DataSource:
    path = Path(data).expanduser()
    try:
        if path.is_dir() and any(path.glob("**/metadata.jsonl")):
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path), streaming=True)
        else:
            loaded = datasets.load_dataset(str(path) if path.exists() else data, streaming=True)
    except Exception as err:  # as in load_image_caption_dataset: every "cannot load" means the same to a user
        raise UserError(f"cannot stream dataset '{data}': {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    ds = split_with_columns(loaded, data, split, image_column, caption_column)
    n = ds.num_shards
    identity = _files_signature(path) if path.exists() else data  # a remote name: its files cannot be listed here
    shards = [SourceShard(f"stream-{i:05d}", _dataset_rows(ds.shard(num_shards=n, index=i), image_column))
              for i in range(n)]
    return DataSource(shards, {"kind": "streaming", "data": identity, "split": split, "shards": n,
                               "image_column": image_column, "caption_column": caption_column}, caption_column)


def _open_image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, dict):
        return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    raise TypeError(f"cannot read an image from a {type(value).__name__}")


@dataclass
class Prepared:
    """A row ready for the autoencoder: pixels in [-1, 1] at its bucket's size, its caption variants, and where it
    came from (position in its shard; original size and crop, for size/crop conditioning)."""

    pixels: Any
    captions: list[str]
    position: int
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def prepare(row: Row, caption_column: str, templates: tuple[str, ...], bucketer: Bucketer,
            counts: Counter) -> Prepared | None:
    """Decode, caption and fit one row to its bucket; None (and one count under its reason) when unusable."""
    if row.fields is None:
        counts[row.reason] += 1
        return None
    caption = row.fields.get(caption_column)
    if not isinstance(caption, str) or not caption.strip():
        counts["missing or empty caption"] += 1
        return None
    try:
        image = _open_image(row.image)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, TypeError, Image.DecompressionBombError):
        counts["undecodable image"] += 1
        return None
    try:
        captions = format_captions(row.fields, caption_column, templates)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"caption template field {err} is not a text field of row {row.position}; its fields: "
                        f"caption, article, {', '.join(row.fields)}") from err
    fitted = bucketer.fit(to_rgb(image))
    return Prepared(pil_to_tensor(fitted.image), captions, row.position, fitted.original_size, fitted.crop_top_left)


class _WorkerRows(torch.utils.data.IterableDataset):
    """One shard prepared by several loader workers: worker w of k decodes rows w, w + k, ... (each reads the whole
    shard, which is cheap beside decoding) and yields (row index, Prepared or None), then (-1, its counts)."""

    def __init__(self, shard: SourceShard, caption_column: str, templates: tuple[str, ...], bucketer: Bucketer):
        self.shard, self.caption_column, self.templates, self.bucketer = shard, caption_column, templates, bucketer

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        shard_counts, row_counts = Counter(), Counter()
        for index, row in enumerate(self.shard.rows(shard_counts)):
            if index % workers == worker:
                yield index, prepare(row, self.caption_column, self.templates, self.bucketer, row_counts)
        yield -1, row_counts + (shard_counts if worker == 0 else Counter())  # shard-level problems counted once


def _unchanged(item):
    return item


def prepared_rows(shard: SourceShard, caption_column: str, templates: tuple[str, ...], bucketer: Bucketer,
                  counts: Counter, workers: int = 0) -> Iterator[Prepared]:
    """The usable rows of `shard` in their order, decoded in this process or, with `workers` > 0, in that many
    loader processes (put back in order here, so the result does not depend on `workers`)."""
    if workers <= 0:
        for row in shard.rows(counts):
            prepared = prepare(row, caption_column, templates, bucketer, counts)
            if prepared is not None:
                yield prepared
        return
    loader = torch.utils.data.DataLoader(_WorkerRows(shard, caption_column, templates, bucketer), batch_size=None,
                                         num_workers=workers, collate_fn=_unchanged,
                                         generator=torch.Generator())  # leaves the global RNG untouched
    waiting, expected = {}, 0
    for index, item in loader:
        if index < 0:
            counts.update(item)
            continue
        waiting[index] = item
        while expected in waiting:
            prepared = waiting.pop(expected)
            expected += 1
            if prepared is not None:
                yield prepared
