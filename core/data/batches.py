"""The batch order of training from the cache: every batch from one bucket, split across ranks, resumable exactly.

Per epoch, from (seed, epoch) alone: each bucket's items are shuffled and cut into full batches, the batches of all
buckets are shuffled together, and batch j goes to rank j % world_size (the list cut to a multiple of world_size, so
every rank takes the same number of steps). Dataloader workers fetch whole batches, so no item is read twice. The
position is (epoch, batches taken), which the checkpoint already holds; `set_position` restarts there. Written by
hand because Accelerate's and torch's samplers neither keep a batch to one image size nor split by batch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from core.errors import UserError


class BucketBatchSampler:
    """Batches of indices for one rank; `bucket_of[i]` is item i's bucket."""

    def __init__(self, bucket_of: Sequence[int] | torch.Tensor, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, exclude: torch.Tensor | None = None) -> None:
        self.bucket_of = torch.as_tensor(bucket_of, dtype=torch.int64).clone()
        if exclude is not None and len(exclude):  # held-out items (the validation share) are never drawn
            self.bucket_of[exclude] = -1
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.skip = 0, 0
        drawn = self.bucket_of[self.bucket_of >= 0]
        counts = torch.bincount(drawn) if len(drawn) else torch.zeros(0, dtype=torch.int64)
        self.per_rank = int((counts // batch_size).sum()) // world_size
        if self.per_rank == 0:
            raise UserError(f"no bucket holds a full batch of {batch_size} images for each of {world_size} rank(s) "
                            f"(bucket sizes: {counts.tolist()}); lower batch_size or add data")

    def __len__(self) -> int:
        return self.per_rank

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Start the next iteration at `epoch`, after its first `skip` batches of this rank."""
        self.epoch, self.skip = epoch, skip

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of `epoch`, in order (rank r takes every world_size-th, from r)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for bucket in torch.unique(self.bucket_of[self.bucket_of >= 0]).tolist():
            items = torch.nonzero(self.bucket_of == bucket).flatten()
            items = items[torch.randperm(len(items), generator=generator)]
            full = len(items) // self.batch_size * self.batch_size
            batches += items[:full].reshape(-1, self.batch_size).tolist()
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[j] for j in order][: self.per_rank * self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.epoch_batches(self.epoch)[self.rank::self.world_size]
        skip, self.skip = self.skip, 0
        yield from mine[skip:]
