"""Latent and text-state cache: the data encoded once by the frozen stages, as shards on disk read row by row.

One cache shard per source shard (core/data/sources.py), built by the rank that owns it (shard i on rank
i % world_size, all ranks in parallel) and written atomically, so a killed build keeps every finished shard and never
takes a partial one. Per image, grouped by bucket: the autoencoder posterior's mean and log-variance (every epoch
still draws a fresh latent sample, as encoding on the fly does), the ids of its caption variants, and its position,
original size and crop (and for a ControlNet run, its control map as uint8 pixels: ldm/control.py); per shard, the
text encoder's hidden states of its distinct captions. Stored in
`cache_dtype` (float16 halves the disk; see docs/data.md for the loss it changes).

Training reads one row at a time (core/data/rows_file.py), so a rank's memory does not grow with the dataset. The
folder is named by a hash of everything that decides its contents (the data, buckets, caption templates, both frozen
stages' weights, text length, dtype), so a change to any of them builds a new one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from core.data.buckets import Bucketer
from core.data.rows_file import SafetensorsRows
from core.data.sources import DataSource, SourceShard, prepared_rows
from core.errors import UserError
from core.files import atomic_write
from core.locks import FileLock
from ldm.control import CANNY_THRESHOLDS, COLOUR_CELLS, control_tensor

logger = logging.getLogger(__name__)

CACHE_VERSION = 3
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INFO_COLUMNS = ("position", "original_height", "original_width", "crop_top", "crop_left")
DIGESTS_RECORD = "source-digests.json"  # in cache_dir: the tar shards' SHA-256 by file version (file_digests)


def module_digest(module: nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class CacheInputs:
    """Everything a cache is built from."""

    source: DataSource
    templates: tuple[str, ...]
    bucketer: Bucketer
    vae: nn.Module
    text_encoder: nn.Module
    dtype: str = "float16"
    batch_size: int = 64
    workers: int = 0  # loader processes decoding images (the result is the same for any number)
    control_type: str | None = None  # also store each image's control map of this kind (ldm/control.py)

    def key(self, data: dict | None = None) -> str:
        """A hash that changes whenever the data (tar shards by their bytes), the buckets, the templates or a frozen
        stage changes; `data`: the source's identity where already taken (DataSource.identity)."""
        if self.dtype not in DTYPES:
            raise UserError(f"cache_dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        data = self.source.identity() if data is None else data
        spec = {"version": CACHE_VERSION, "data": data, "pixels": self.bucketer.spec(),
                "caption_templates": list(self.templates), "vae": module_digest(self.vae),
                "text_encoder": module_digest(self.text_encoder), "text_max_length": self.text_encoder.max_length,
                "dtype": self.dtype}
        if self.control_type is not None:  # absent otherwise, so the caches of other runs keep their names
            spec["control"] = {"type": self.control_type, "canny_thresholds": list(CANNY_THRESHOLDS),
                               "colour_cells": COLOUR_CELLS}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.safetensors"


def group_name(height: int, width: int) -> str:
    """The tensors of one bucket (pixel height x width) inside a shard."""
    return f"h{height}w{width}"


@torch.no_grad()
def encode_shard(inputs: CacheInputs, shard: SourceShard, device: torch.device) -> tuple[dict, dict[str, str]]:
    """One source shard encoded: (tensors, metadata) of its cache shard. Memory: one batch of pixels per bucket,
    the shard's latents and its distinct captions' states."""
    dtype, counts = DTYPES[inputs.dtype], Counter()
    pending: dict[tuple[int, int], list] = defaultdict(list)
    out: dict[tuple[int, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    caption_ids: dict[str, int] = {}

    def flush(bucket: tuple[int, int]) -> None:
        rows = pending.pop(bucket)
        pixels = torch.stack([r.pixels for r in rows])
        posterior = inputs.vae.encode(pixels.to(device)).latent_dist
        if inputs.control_type is not None:
            out[bucket]["control"].append(control_tensor(pixels, inputs.control_type))
        out[bucket]["moments"].append(torch.cat([posterior.mean, posterior.logvar], dim=1).cpu().to(dtype))
        out[bucket]["caption_ids"].append(torch.tensor([[caption_ids.setdefault(c, len(caption_ids))
                                                         for c in r.captions] for r in rows]))
        out[bucket]["info"].append(torch.tensor([[r.position, *r.original_size, *r.crop_top_left] for r in rows]))

    for prepared in prepared_rows(shard, inputs.source.caption_column, inputs.templates, inputs.bucketer, counts,
                                  inputs.workers):
        bucket = tuple(prepared.pixels.shape[1:])
        pending[bucket].append(prepared)
        if len(pending[bucket]) == inputs.batch_size:
            flush(bucket)
    for bucket in list(pending):
        flush(bucket)
    captions = list(caption_ids)
    states = [inputs.text_encoder.encode(captions[i:i + inputs.batch_size]).hidden_states.cpu().to(dtype)
              for i in range(0, len(captions), inputs.batch_size)]
    width = (inputs.text_encoder.max_length, inputs.text_encoder.hidden_size)
    tensors = {"text_states": torch.cat(states) if states else torch.zeros((0, *width), dtype=dtype)}
    for (height, w), fields in out.items():
        tensors.update({f"{group_name(height, w)}.{k}": torch.cat(v).contiguous() for k, v in fields.items()})
    images = sum(len(t) for k, t in tensors.items() if k.endswith(".info"))
    return tensors, {"source": shard.name, "images": str(images), "skipped": json.dumps(dict(counts))}


def _write(target: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Atomically; a full disk stops the build with one line (finished shards stay, a rerun continues)."""
    data = save(tensors, metadata=metadata)  # bytes, written by Python: a failed write is an OSError with its errno
    try:
        atomic_write(target, lambda tmp: tmp.write_bytes(data))
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        free = shutil.disk_usage(target.parent).free
        raise UserError(f"could not write cache shard {target} ({err.strerror}); {free / 1e6:.1f} MB are free "
                        f"there. Free space (or set cache_dir= on a larger disk) and run again: the finished "
                        f"shards are kept and only the rest are built") from err


class CachedLatents(torch.utils.data.Dataset):
    """Rows of a complete cache, read from disk one at a time: posterior mean and log-variance (float32), the shard
    and ids of its caption variants, position, original size and crop. The text states are read by `text_states`
    once the recipe has drawn a variant, so each step reads one variant's states per image, not every variant's."""

    def __init__(self, folder: Path, shards: int) -> None:
        self.folder = folder
        self.files = [SafetensorsRows(shard_path(folder, i)) for i in range(shards)]
        self.empty_embedding = load_file(folder / "empty.safetensors")["empty"].float()
        groups = sorted({name.split(".")[0] for f in self.files for name in f.tensors if name.endswith(".info")},
                        key=lambda g: tuple(int(x) for x in g[1:].split("w")))
        self.buckets = [tuple(int(x) for x in g[1:].split("w")) for g in groups]  # pixel (height, width)
        self.skipped: Counter = Counter()
        runs = []  # (shard, bucket, images) of every bucket group in every shard, in order
        for s, f in enumerate(self.files):
            self.skipped.update(json.loads(f.metadata.get("skipped", "{}")))
            runs += [(s, g, f.shape(f"{name}.info")[0]) for g, name in enumerate(groups) if f"{name}.info" in f]
        self.groups = groups
        # three int32 per image: 12 bytes (1.2 MB per 100,000 images) is all that grows with the data
        shard_ids, bucket_ids, sizes = (torch.tensor([r[i] for r in runs], dtype=torch.int64).reshape(-1)
                                        for i in range(3))
        self.shard_of = torch.repeat_interleave(shard_ids, sizes).to(torch.int32)
        self.bucket_of = torch.repeat_interleave(bucket_ids, sizes).to(torch.int32)
        self.row_of = (torch.cat([torch.arange(n, dtype=torch.int32) for n in sizes.tolist()]) if runs
                       else torch.zeros(0, dtype=torch.int32))

    def __len__(self) -> int:
        return len(self.row_of)

    def __getitem__(self, i: int) -> dict:
        shard, name, row = int(self.shard_of[i]), self.groups[self.bucket_of[i]], int(self.row_of[i])
        f = self.files[shard]
        moments = f.row(f"{name}.moments", row).float()
        mean, logvar = moments.chunk(2, dim=0)
        info = f.row(f"{name}.info", row)
        control = {"control": f.row(f"{name}.control", row)} if f"{name}.control" in f else {}
        return {"latent_mean": mean, "latent_logvar": logvar, "shard": torch.tensor(shard),
                "caption_ids": f.row(f"{name}.caption_ids", row), "index": info[0], "original_size": info[1:3],
                "crop_top_left": info[3:5], **control}

    def text_states(self, shards: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        """(images, length, width) float32: the states of caption `caption_ids[k]` of shard `shards[k]`, each read
        from disk; an id of -1 gives the empty caption's states (condition dropout) without a read."""
        return torch.stack([self.empty_embedding if j < 0 else self.files[s].row("text_states", j).float()
                            for s, j in zip(shards.tolist(), caption_ids.tolist())])


def _wait_for_shards(folder: Path, shards: int, poll: float = 2.0) -> None:
    """Until every rank's shards are on disk (a polling wait: a build can outlast the collective timeout)."""
    while missing := [i for i in range(shards) if not shard_path(folder, i).is_file()]:
        logger.debug("waiting for %d cache shards from other ranks", len(missing))
        time.sleep(poll)


def load_or_build_cache(state, inputs: CacheInputs, cache_dir: str | Path) -> CachedLatents:
    """The cache of `inputs`: each rank (`state`: an Accelerator or PartialState) builds its missing shards, then all
    read the whole. Runs sharing a `cache_dir` take turns per shard through a lock, so none builds a shard twice."""
    data = inputs.source.identity(Path(cache_dir) / DIGESTS_RECORD)
    folder = Path(cache_dir) / inputs.key(data)
    folder.mkdir(parents=True, exist_ok=True)
    shards = inputs.source.shards
    mine = [i for i in range(state.process_index, len(shards), state.num_processes)]
    todo = [i for i in mine if not shard_path(folder, i).is_file()]
    if todo:
        logger.info("building latent/text cache in %s: %d of %d shards on this rank (%d already built)", folder,
                    len(todo), len(mine), len(mine) - len(todo))
    for i in tqdm(todo, desc="caching", unit="shard", disable=not todo):
        target = shard_path(folder, i)
        with FileLock(folder / f".{target.name}.lock", f"cache shard {target}", wait=float("inf")):
            if target.is_file():  # another run built it meanwhile
                continue
            tensors, metadata = encode_shard(inputs, shards[i], state.device)
            _write(target, tensors, metadata)
        skipped = json.loads(metadata["skipped"])
        if skipped:
            logger.warning("shard %s: %s images, skipped %s", shards[i].name, metadata["images"],
                           ", ".join(f"{n} ({reason})" for reason, n in sorted(skipped.items())))
    if state.process_index == 0 and not (folder / "empty.safetensors").is_file():
        empty = inputs.text_encoder.encode([""]).hidden_states[0].cpu().to(DTYPES[inputs.dtype]).contiguous()
        _write(folder / "empty.safetensors", {"empty": empty}, {})
        atomic_write(folder / "spec.json", lambda tmp: tmp.write_text(json.dumps(
            {"data": data, "pixels": inputs.bucketer.spec(), "dtype": inputs.dtype,
             "caption_templates": list(inputs.templates), "shards": len(shards),
             **({"control_type": inputs.control_type} if inputs.control_type else {})}, indent=1)))
    _wait_for_shards(folder, len(shards))
    while not (folder / "empty.safetensors").is_file():
        time.sleep(0.5)
    cached = CachedLatents(folder, len(shards))
    if len(cached) == 0:
        raise UserError(f"no usable image in {inputs.source.spec.get('kind')} data: every row was skipped "
                        f"({dict(cached.skipped)})")
    logger.info("latent/text cache %s: %d images in %d shards, buckets %s%s", folder.name, len(cached), len(shards),
                cached.buckets, f"; skipped {dict(cached.skipped)}" if cached.skipped else "")
    return cached
