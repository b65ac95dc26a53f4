"""One row of a tensor in a safetensors file, read with a positioned read (os.pread) of just its bytes.

By hand because safetensors' own readers load a whole tensor or memory-map the file, and mapped pages that training
touches count in a process's resident memory, which would grow with the dataset over an epoch; a pread does not.
The file layout (8-byte little-endian header length, JSON header of dtype / shape / byte offsets, then the data) is
safetensors' documented format.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64, "I32": torch.int32,
          "U8": torch.uint8}


class SafetensorsRows:
    """The header of one safetensors file, and `row(name, i)` = tensor `name`[i] read from disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.base = 8 + length
        self.tensors = {name: (DTYPES[t["dtype"]], tuple(t["shape"]), t["data_offsets"][0])
                        for name, t in header.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def row(self, name: str, index: int) -> torch.Tensor:
        dtype, shape, start = self.tensors[name]
        if not 0 <= index < shape[0]:
            raise IndexError(f"row {index} of {name} in {self.path} (it has {shape[0]})")
        size = math.prod(shape[1:]) * dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, size, self.base + start + index * size)
        finally:
            os.close(fd)
        if len(data) != size:
            raise OSError(f"{self.path} is shorter than its header says (a truncated cache shard)")
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape[1:])
