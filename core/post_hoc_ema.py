"""Post-hoc EMA (EDM2, Karras et al. 2024, section 3): during training, two or more power-function EMAs of the
weights are tracked and snapshotted every few steps; after training, an EMA of any length in between is synthesised
from the snapshots by least squares (the paper's algorithm 3), so the EMA length is chosen by a score instead of
fixed in advance.

The averaging, the snapshots and the synthesis are ema-pytorch's `PostHocEMA` (the paper's algorithm, in the field's
library); this module fixes where snapshots live, which lengths are valid, and hands back plain state dicts.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from ema_pytorch import PostHocEMA
from torch import nn

from core.errors import UserError

logger = logging.getLogger(__name__)

SNAPSHOT_FOLDER = "post-hoc-ema"  # under the run's output_dir: {profile index}.{step}.pt per snapshot
PROFILES = "profiles.json"  # beside the snapshots: the relative lengths their profile indices stand for
MAX_SIGMA_REL = 12 ** -0.5  # sigma_rel of gamma = 0, the longest power-function EMA (a plain average of all steps)
_SNAPSHOT = re.compile(r"^(\d+)\.(\d+)\.pt$")


def check_sigma_rels(values: list[float], what: str = "post_hoc_ema") -> None:
    """Relative EMA lengths: each in (0, 12^-1/2) (EDM2's sigma_rel; the paper tracks 0.05 and 0.10), two at
    least and all different, since a length is synthesised from several."""
    if len(values) < 2 or len(set(values)) != len(values):
        raise UserError(f"{what} needs two or more different relative EMA lengths (EDM2 tracks [0.05, 0.10]), got "
                        f"{values}")
    for value in values:
        if not isinstance(value, (int, float)) or not 0 < value < MAX_SIGMA_REL:
            raise UserError(f"{what}: relative EMA length {value} is outside (0, {MAX_SIGMA_REL:.4f})")


def record_profiles(folder: Path, sigma_rels: list[float]) -> None:
    """Write (or check) the lengths the snapshots in `folder` are made with: a resumed run that tracks other ones
    would mix two sets of averages under the same file names."""
    file = folder / PROFILES
    if file.is_file():
        recorded = json.loads(file.read_text())["sigma_rels"]
        if recorded != list(sigma_rels):
            raise UserError(f"the post-hoc EMA snapshots in {folder} track lengths {recorded}; this run asks for "
                            f"{list(sigma_rels)}: keep post_hoc_ema as it was, or train into another output_dir")
        return
    folder.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({"sigma_rels": list(sigma_rels)}) + "\n")


def recorded_profiles(folder: Path) -> list[float]:
    """The lengths the snapshots in `folder` were made with (`record_profiles`)."""
    file = folder / PROFILES
    if not file.is_file():
        raise UserError(f"no post-hoc EMA snapshots in {folder} (no {PROFILES}): train with post_hoc_ema=[0.05, 0.10]")
    return json.loads(file.read_text())["sigma_rels"]


def tracker(model: nn.Module, sigma_rels: list[float], folder: Path) -> PostHocEMA:
    """The averages of `model` at `sigma_rels`, updated by `.update()` after each optimiser step (every step:
    update_every=1 keeps the power-function profile exact) and snapshotted into `folder` by `.checkpoint()`."""
    return PostHocEMA(model, sigma_rels=tuple(sigma_rels), update_every=1, checkpoint_every_num_steps="manual",
                      checkpoint_folder=str(folder), checkpoint_dtype=torch.float32)


def snapshot_steps(folder: Path) -> list[int]:
    """The steps with snapshots in `folder`, ascending."""
    names = [_SNAPSHOT.match(p.name) for p in folder.glob("*.pt")] if folder.is_dir() else []
    return sorted({int(m.group(2)) for m in names if m})


def reconstructible(sigma_rels: list[float]) -> tuple[float, float]:
    """The lengths synthesised well from snapshots of `sigma_rels`: [0.4 x the shortest, 2 x the longest], within
    (0, 12^-1/2). Measured (tests/test_post_hoc_ema.py's trajectory, tracked 0.05 and 0.10): within 0.004 of the
    true average over [0.02, 0.2], 0.018 off at 0.01 and 0.045 at 0.28."""
    return 0.4 * min(sigma_rels), min(2 * max(sigma_rels), MAX_SIGMA_REL - 1e-3)


def drop_snapshots_after(folder: Path, step: int) -> None:
    """Remove this run's snapshots past `step`, where training (re)starts: they belong to a trajectory that a
    resume from an earlier checkpoint (or a fresh start) abandoned, and must not be averaged with the new one."""
    stale = [p for p in folder.glob("*.pt") if _SNAPSHOT.match(p.name) and int(_SNAPSHOT.match(p.name).group(2)) > step]
    for path in stale:
        path.unlink()
    if stale:
        logger.info("post-hoc EMA: removed %d snapshots past step %d (from before this start)", len(stale), step)


def synthesize(model: nn.Module, folder: Path, sigma_rel: float) -> dict[str, torch.Tensor]:
    """The weights of an EMA of relative length `sigma_rel` at the last snapshot, from the snapshots in `folder`
    (made with the lengths its profiles.json records); `model` gives the architecture (its weights are unused). A
    length outside (0, 12^-1/2) is refused."""
    sigma_rels = recorded_profiles(folder)
    check_sigma_rels(sigma_rels, "the run's post_hoc_ema")
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise UserError(f"relative EMA length {sigma_rel} is outside (0, {MAX_SIGMA_REL:.4f})")
    low, high = reconstructible(sigma_rels)
    if not low <= sigma_rel <= high:
        raise UserError(f"relative EMA length {sigma_rel} is outside what the snapshots of lengths {sigma_rels} "
                        f"reconstruct well, [{low:.4g}, {high:.4g}]: track a wider range (post_hoc_ema) to reach it")
    steps = snapshot_steps(folder)
    if not steps:
        raise UserError(f"no post-hoc EMA snapshots in {folder}: train with post_hoc_ema=[0.05, 0.10]")
    stray = [p.name for p in folder.glob("*.pt") if not _SNAPSHOT.match(p.name)
             or int(_SNAPSHOT.match(p.name).group(1)) >= len(sigma_rels)]
    if stray:
        raise UserError(f"{folder} holds files that are not this run's snapshots: {', '.join(sorted(stray)[:3])}")
    averages = tracker(model, sigma_rels, folder)
    synthesized = averages.synthesize_ema_model(sigma_rel=sigma_rel)
    return {name: tensor.detach().clone() for name, tensor in synthesized.ema_model.state_dict().items()}
