"""Which images the validation loss uses: a held-out split, or a seeded share of the training data kept out of it.

Fixed for a run (and for every run with the same data and seed), so the validation loss is comparable across steps
and runs; each recipe turns the rows into its own fixed batches (core/trainer.py's `build_validation`).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch

from core.errors import UserError

logger = logging.getLogger(__name__)


def held_out_indices(count: int, fraction: float, seed: int) -> torch.Tensor:
    """A seeded `fraction` of range(count), sorted: the same for the same data size and seed, never trained on."""
    if fraction <= 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + 7919))
    return order[:max(1, round(fraction * count))].sort().values


def without(dataset: torch.utils.data.Dataset, held_out: torch.Tensor) -> torch.utils.data.Dataset:
    """`dataset` less the held-out indices (itself when there are none)."""
    if not len(held_out):
        return dataset
    kept = torch.ones(len(dataset), dtype=torch.bool)
    kept[held_out] = False
    return torch.utils.data.Subset(dataset, torch.nonzero(kept).flatten().tolist())


def spread(indices: Iterable[int], limit: int) -> list[int]:
    """At most `limit` of `indices`, evenly spaced (all of them when there are fewer)."""
    indices = list(indices)
    if len(indices) <= limit:
        return indices
    return [indices[int(j * len(indices) / limit)] for j in range(limit)]


def validation_rows(train: torch.utils.data.Dataset, held_out: torch.Tensor, open_split: Callable[[], object],
                    limit: int, what: str) -> list[dict]:
    """Up to `limit` rows (evenly spaced, undecodable ones left out): of `train` at the held-out indices when there
    are any, else of the dataset `open_split()` returns (its UserError = no such split: no validation loss)."""
    if len(held_out):
        source, chosen = train, spread(held_out.tolist(), limit)
    else:
        try:
            source = open_split()
        except UserError as err:
            logger.info("no validation loss: %s has no held-out split (%s) and validation_fraction is 0", what,
                        str(err).splitlines()[0][:120])
            return []
        chosen = spread(range(len(source)), limit)
    return [row for row in (source[i] for i in chosen) if row is not None]
