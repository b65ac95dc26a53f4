"""WebDataset shard names: a .tar path, a glob, or a brace range such as `shards/{00000..00099}.tar`."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from braceexpand import braceexpand

from core.errors import UserError


def is_tar_pattern(data: str) -> bool:
    """Whether `data` names WebDataset shards (a .tar path, glob or brace range) rather than a folder or dataset."""
    return data.endswith(".tar") or data.endswith(".tar}") or (".tar" in data and ("{" in data or "*" in data))


def expand_tar_pattern(data: str) -> list[Path]:
    """Every existing file that `data` names (brace ranges, then globs), in order; one-line error if none."""
    paths: list[Path] = []
    for pattern in braceexpand(os.path.expanduser(data)):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        paths += [Path(m) for m in matches if Path(m).is_file()]
    if not paths:
        raise UserError(f"data={data} matches no tar file: check the path and the brace range "
                        "(e.g. shards/{00000..00009}.tar), or write shards with `ldm data shards`")
    return list(dict.fromkeys(paths))
