"""Checkpoint folders: atomic writes, resume (which checkpoint a run continues from), and loading.

A checkpoint is a folder `checkpoints/step-XXXXXXXX/` holding Accelerate's state (models, optimiser, LR schedule,
scaler, RNG of every rank, registered objects such as the EMA), `trainer_state.json` and the resolved `config.yaml`.
It is written under a temporary name and renamed when complete, so a killed run never leaves a folder that resume
would pick up half-written.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from core.accelerator import all_ranks_true
from core.config import save_config
from core.errors import MissingFileError, UserError
from core.locks import FileLock

CHECKPOINT_PREFIX = "step-"
LOCK_NAME = ".lock"  # the running process's lock file in its output_dir (core/locks.py)
REGENERATED = {"logs", "cache", "samples", "best", LOCK_NAME}  # what a fresh start may find in an output_dir


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
        if output_dir.is_dir() and any(not _is_lock(p.name) for p in output_dir.iterdir()):
            raise UserError(f"output_dir {output_dir} is not empty; pass resume=auto to continue the run in it, "
                            "or choose a new output_dir")
        return None
    if resume == "auto":
        if existing:
            return existing[-1]
        leftovers = [p for p in output_dir.iterdir() if p.name not in REGENERATED and not _is_lock(p.name)] \
            if output_dir.is_dir() else []
        if leftovers:
            raise UserError(f"output_dir {output_dir} holds files but no complete checkpoint to resume from; "
                            "choose a new output_dir or delete it")
        return None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"resume={resume} is not a complete checkpoint folder (no trainer_state.json)")
    return path


def _is_lock(name: str) -> bool:
    """The lock file (core/locks.py), or a lock record that an earlier release's lock code could leave behind."""
    return name == LOCK_NAME or name.startswith(LOCK_NAME + ".")


def lock_output_dir(accelerator: Accelerator, output_dir: str | Path) -> FileLock:
    """The main process holds output_dir/.lock for the run, so a second run on the same output_dir stops at once with
    the first one's name instead of overwriting its checkpoints; every rank stops together."""
    lock = FileLock(Path(output_dir) / LOCK_NAME, f"output_dir {output_dir}")
    error = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except UserError as err:
            error = err
    if not all_ranks_true(accelerator, error is None):
        raise error or UserError(f"output_dir {output_dir} is in use by another run (see the main process's message)")
    return lock


def save_trained_weights_only(accelerator: Accelerator) -> None:
    """Make Accelerate's checkpoints hold only the trained (`requires_grad`) weights of each prepared model, e.g. a
    LoRA adapter without its frozen base, and load them back strictly by name (every trained weight, nothing else).
    Through Accelerate's save/load hooks, as diffusers' LoRA scripts do; the base comes from the config on resume."""
    from safetensors.torch import load_file

    def kept(model: torch.nn.Module) -> set[str] | None:
        """The names a checkpoint keeps: trained parameters and buffers, or None (all) without frozen weights."""
        params = dict(model.named_parameters())
        if all(p.requires_grad for p in params.values()):
            return None
        return {n for n, p in params.items() if p.requires_grad} | {n for n, _ in model.named_buffers()}

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i, model in enumerate(models[:len(weights)]):  # FSDP / DeepSpeed save their own way (no weights here)
            keep = kept(model)
            if keep is not None:
                weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):  # all of them here: Accelerate finds a model's file by its index
            file = Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"
            state, keep = load_file(file), kept(model)
            if keep is not None and set(state) != keep:
                raise UserError(f"{file} holds other trained weights than this run trains ({len(state)} vs "
                                f"{len(keep)} tensors): resume with the settings it was written with")
            model.load_state_dict(state, strict=keep is None)
        models.clear()  # loaded here: Accelerate's strict load of each whole model is skipped

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, config: Any, states: dict,
                    trainer_state: dict, keep: int) -> Path:
    """Write the full training state atomically (a uniquely named temporary folder, then a rename) and keep only the
    last `keep`. `states` (name -> object with `state_dict`, the same on every rank) are saved by the main process as
    `NAME.pt`, plain tensors and numbers that load with `weights_only=True`. Any failure on any rank (a full disk
    raises OSError, torch's RuntimeError or safetensors' error) removes the partial folder, keeps every complete
    checkpoint, and stops every rank with one line naming the disk and the space a checkpoint needs."""
    folder = checkpoints_dir(output_dir)
    final = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    token = [uuid.uuid4().hex[:8] if accelerator.is_main_process else None]
    broadcast_object_list(token)  # every rank writes its own files into the same temporary folder
    tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{step:08d}-{token[0]}"
    error = None
    try:
        if accelerator.is_main_process:
            tmp.mkdir(parents=True)
    except Exception as err:  # noqa: BLE001 - whatever the writer raised, the run stops cleanly below
        error = err
    # the same collectives on every rank whatever fails where (a rank that failed must not skip a barrier the others
    # wait at); Accelerate's save_state holds none for DDP
    if all_ranks_true(accelerator, error is None):
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)
            if accelerator.is_main_process:
                for name, obj in states.items():
                    torch.save(obj.state_dict(), tmp / f"{name}.pt")
                save_config(config, tmp / "config.yaml")
                (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
                _fsync_tree(tmp)
        except Exception as err:  # noqa: BLE001
            error = err
    if not all_ranks_true(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(_failed_save_message(output_dir, step, error)) from error
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _failed_save_message(output_dir: str | Path, step: int, error: BaseException | None) -> str:
    folder = checkpoints_dir(output_dir)
    reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
    existing = list_checkpoints(output_dir)
    free = shutil.disk_usage(folder if folder.exists() else Path(output_dir)).free
    if existing:
        size = sum(p.stat().st_size for p in existing[-1].rglob("*") if p.is_file())
        need = f"a checkpoint takes {size / 1e6:.1f} MB and {free / 1e6:.1f} MB are free there"
        resume = f"resume=auto continues from {existing[-1].name}, which is intact"
    else:
        need = f"{free / 1e6:.1f} MB are free there"
        resume = "no earlier checkpoint exists, so the run starts again from step 0"
    return (f"could not write the checkpoint of step {step} to {folder} ({reason}); {need}. Free space (or lower "
            f"keep_checkpoints) and run again: {resume}")


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def load_checkpoint(accelerator: Accelerator, path: Path, states: dict) -> dict:
    """Restore the full training state; returns trainer_state.json (step, data position, counters).

    Nothing is unpickled beyond what torch's `weights_only=True` allows (tensors, numbers, containers; Accelerate's
    own loads use it too, with an allow-list for its sampler and RNG states), so a checkpoint from someone else cannot
    run code. Checkpoints written before 2026-12-02 held the EMA and LR schedule as full pickles and are refused."""
    if any(path.glob("custom_checkpoint_*.pkl")):
        raise UserError(f"{path} was written by an older version that pickled the EMA and LR schedule (loading it "
                        "could run code); start a new run, or train from its weights with init_from")
    for name, obj in states.items():
        try:
            state = torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True)
        except FileNotFoundError as err:  # e.g. use_ema turned on for a run whose checkpoints have no EMA
            raise MissingFileError(f"{path} has no {name}.pt, which this run's settings need; resume with the "
                                   "settings it was written with, or start a new run") from err
        except pickle.UnpicklingError as err:
            raise UserError(f"{path / f'{name}.pt'} holds pickled objects beyond tensors and numbers; refusing to "
                            "load it (it could run code)") from err
        obj.load_state_dict(state)
    accelerator.load_state(str(path))
    return json.loads((path / "trainer_state.json").read_text())
