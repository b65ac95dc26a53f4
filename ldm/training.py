"""What both training recipes share: output folders, atomic checkpoints, resume, non-finite loss guard, logging.

A checkpoint is a folder `checkpoints/step-XXXXXXXX/` holding Accelerate's state (models, optimiser, LR schedule,
scaler, RNG of every rank, registered objects such as the EMA), `trainer_state.json` and the resolved `config.yaml`.
It is written under a temporary name and renamed when complete, so a killed run never leaves a folder that resume
would pick up half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Iterable
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from ldm.config import save_config
from ldm.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
REGENERATED = {"logs", "cache", "samples"}  # what a fresh start may overwrite in an output_dir without checkpoints


def make_accelerator(output_dir: str, gradient_accumulation_steps: int = 1,
                     ddp_timeout_minutes: int = 10) -> Accelerator:
    """Accelerator with TensorBoard logs in `output_dir/logs`, a seeded resumable shuffling sampler, and a
    collective timeout so that the other ranks fail (instead of waiting forever) when one rank dies."""
    return Accelerator(
        log_with="tensorboard",
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


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """Which checkpoint to start from: `auto` = the latest complete one (or none), `never`, or an explicit path.

    Refuses to start fresh in a folder that already holds a run, so nothing is silently overwritten.
    """
    output_dir = Path(output_dir)
    existing = list_checkpoints(output_dir)
    if resume in (None, "", "never", "none"):
        if output_dir.is_dir() and any(output_dir.iterdir()):
            raise UserError(f"output_dir {output_dir} is not empty; pass resume=auto to continue the run in it, "
                            "or choose a new output_dir")
        return None
    if resume == "auto":
        if existing:
            return existing[-1]
        if output_dir.is_dir() and any(p.name not in REGENERATED for p in output_dir.iterdir()):
            raise UserError(f"output_dir {output_dir} holds files but no complete checkpoint to resume from; "
                            "choose a new output_dir or delete it")
        return None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"resume={resume} is not a complete checkpoint folder (no trainer_state.json)")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, config: Any,
                    trainer_state: dict, keep: int) -> Path:
    """Write the full training state atomically (temp folder, then rename) and keep only the last `keep`."""
    folder = checkpoints_dir(output_dir)
    final = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            save_config(config, tmp / "config.yaml")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
            _fsync_tree(tmp)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint at step {step} ({err}); the previous checkpoint is intact") \
            from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    """Restore the full training state; returns trainer_state.json (step, data position, counters)."""
    accelerator.load_state(str(path))
    return json.loads((path / "trainer_state.json").read_text())


class NonFiniteGuard:
    """Counts NaN / inf losses in a row; the step is skipped, and after `max_in_row` the run stops clearly."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row, self.in_row, self.total = max_in_row, 0, 0

    def check(self, finite: bool, step: int) -> bool:
        """Pass through `finite` (train on the step) after counting; raises after too many bad steps in a row."""
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        logger.warning("non-finite loss at step %d (%d in a row, %d in total); step skipped", step, self.in_row,
                       self.total)
        if self.in_row >= self.max_in_row:
            raise UserError(f"loss was NaN/inf for {self.in_row} steps in a row (at step {step}); stopping without "
                            "saving. Lower learning_rate, or resume from the last checkpoint")
        return False


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


def endless_batches(accelerator: Accelerator, loader, batches_seen: int):
    """Yield batches epoch after epoch, resuming mid-epoch after `batches_seen` batches (the data position).

    The sampler is reseeded from (seed, epoch) each epoch, so a resumed run sees the same batches in the same order.
    """
    batches_per_epoch = len(loader)
    if batches_per_epoch == 0:
        raise UserError("the dataset has fewer images than one batch; lower batch_size")
    epoch, skip = divmod(batches_seen, batches_per_epoch)
    while True:
        loader.set_epoch(epoch)
        yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
        epoch, skip = epoch + 1, 0
