"""Accelerate set-up and the collective checks the training loop needs so that every rank takes the same path."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Iterator

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from core.errors import UserError


def make_accelerator(output_dir: str, gradient_accumulation_steps: int = 1, ddp_timeout_minutes: int = 10,
                     log_with: list[str] | None = None) -> Accelerator:
    """Accelerator with its trackers' logs in `output_dir/logs` (TensorBoard by default; wandb offline unless
    WANDB_MODE is set; mlflow's file store there unless MLFLOW_TRACKING_URI is set), a seeded resumable shuffling
    sampler, and a collective timeout so that the other ranks fail (instead of waiting forever) when one rank dies."""
    logs = Path(output_dir) / "logs"
    if "wandb" in (log_with or []):  # no network unless the user asks for it
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(logs))
    if "mlflow" in (log_with or []):  # a local file store beside the run instead of ./mlruns
        os.environ.setdefault("MLFLOW_TRACKING_URI", (logs / "mlruns").resolve().as_uri())
    return Accelerator(
        log_with=log_with or ["tensorboard"],
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=str(Path(output_dir) / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        gradient_accumulation_steps=gradient_accumulation_steps,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=ddp_timeout_minutes))],
    )


def setup_logging(accelerator: Accelerator) -> None:
    """INFO on the main process, warnings only elsewhere, so a 2-rank run does not print everything twice."""
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def all_ranks_true(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on every rank, so that all ranks skip (or take) the same step and none waits forever."""
    failures = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(failures, reduction="sum").item() == 0)


def step_is_finite(accelerator: Accelerator, grad_norm: torch.Tensor | None, loss: torch.Tensor) -> bool:
    """Whether this optimiser step is usable on every rank.

    The gradient norm comes from gradients already all-reduced by DDP, so it is the same on every rank and needs no
    extra collective; DeepSpeed clips inside its engine and returns no norm, so then the loss is checked on all ranks.
    """
    if grad_norm is None:
        return all_ranks_true(accelerator, bool(torch.isfinite(loss.detach()).all()))
    return bool(torch.isfinite(grad_norm))


def assert_replicas_in_sync(accelerator: Accelerator, tensors: Iterable[torch.Tensor], what: str) -> None:
    """Compare a checksum of `tensors` across ranks; DDP and a correct EMA keep every rank's copy identical."""
    tensors = list(tensors)
    checksum = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().abs().sum()])
                            for t in tensors]).sum(0).to(accelerator.device)
    gathered = accelerator.gather(checksum.reshape(1, 2))
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(f"{what} differ across ranks (checksums {gathered.tolist()})")


def endless_batches(accelerator: Accelerator, loader, batches_seen: int) -> Iterator:
    """Yield batches epoch after epoch, resuming mid-epoch after `batches_seen` batches (the data position).

    The sampler is reseeded from (seed, epoch) each epoch, so a resumed run sees the same batches in the same order.
    """
    batches_per_epoch = len(loader)
    if batches_per_epoch == 0:
        raise UserError("the dataset has fewer images than one batch; lower batch_size")
    epoch, skip = divmod(batches_seen, batches_per_epoch)
    sampler = getattr(loader, "batch_sampler", None)
    if hasattr(sampler, "set_position"):  # our own rank-split batch sampler (core/data/batches.py) skips by itself
        while True:
            sampler.set_position(epoch, skip)
            yield from loader
            epoch, skip = epoch + 1, 0
    while True:
        loader.set_epoch(epoch)
        yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
        epoch, skip = epoch + 1, 0
