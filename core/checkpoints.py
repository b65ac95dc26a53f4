"""Checkpoint folders: atomic writes, resume (which checkpoint a run continues from), and loading.

A checkpoint is a folder `checkpoints/step-XXXXXXXX/` holding Accelerate's state (models, optimiser, LR schedule,
scaler, RNG of every rank, registered objects such as the EMA), `trainer_state.json` and the resolved `config.yaml`.
It is written under a temporary name and renamed when complete, so a killed run never leaves a folder that resume
would pick up half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from core.config import save_config
from core.errors import UserError

CHECKPOINT_PREFIX = "step-"
REGENERATED = {"logs", "cache", "samples"}  # what a fresh start may overwrite in an output_dir without checkpoints


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
