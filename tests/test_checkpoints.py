"""Checkpoint safety: partial checkpoints are never chosen, no overwrite (a failed save on a real full disk is in
test_faults.py)."""

import json
from dataclasses import dataclass

import pytest

from core.errors import UserError
from core.checkpoints import list_checkpoints, resolve_resume
from core.trainer import NonFiniteGuard


@dataclass
class Settings:
    max_steps: int = 20


def _fake_checkpoint(output_dir, name, complete=True):
    folder = output_dir / "checkpoints" / name
    folder.mkdir(parents=True)
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"step": int(name.split("-")[-1])}))
    return folder


def test_partial_checkpoints_are_never_picked(tmp_path):
    _fake_checkpoint(tmp_path, "step-00000010")
    _fake_checkpoint(tmp_path, "step-00000020")
    _fake_checkpoint(tmp_path, "step-00000030", complete=False)  # killed while writing its files
    _fake_checkpoint(tmp_path, ".tmp-step-00000040")  # killed before the rename
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000020"]
    assert resolve_resume(tmp_path, "auto").name == "step-00000020"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step-00000030"))


def test_new_run_refuses_a_used_output_dir(tmp_path):
    assert resolve_resume(tmp_path / "new", "never") is None
    assert resolve_resume(tmp_path / "new", "auto") is None
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty; pass resume=auto"):
        resolve_resume(tmp_path, "never")
    with pytest.raises(UserError, match="holds files but no complete checkpoint"):
        resolve_resume(tmp_path, "auto")


def test_nonfinite_guard_counts_and_stops():
    guard = NonFiniteGuard(max_in_row=2)
    assert guard.check(True, 1) and not guard.check(False, 2) and guard.check(True, 3)
    assert not guard.check(False, 4)
    with pytest.raises(UserError, match="NaN/inf for 2 steps in a row"):
        guard.check(False, 5)
    assert guard.total == 3


class _RunsCode:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # what a malicious pickle could do: any call at load time


def test_resuming_a_checkpoint_cannot_run_code(tmp_path):
    import torch
    from accelerate import Accelerator

    from core.checkpoints import load_checkpoint

    folder = _fake_checkpoint(tmp_path, "step-00000010")
    marker = tmp_path / "ran"
    torch.save({"decay": 0.99, "payload": _RunsCode(marker)}, folder / "ema.pt")
    with pytest.raises(UserError, match="ema.pt holds pickled objects beyond tensors and numbers"):
        load_checkpoint(Accelerator(cpu=True), folder, {"ema": None})
    assert not marker.exists()
    with pytest.raises(UserError, match="has no lr_scheduler.pt, which this run's settings need"):
        load_checkpoint(Accelerator(cpu=True), folder, {"lr_scheduler": None})
    (folder / "custom_checkpoint_0.pkl").write_bytes(b"")
    with pytest.raises(UserError, match="written by an older version that pickled the EMA"):
        load_checkpoint(Accelerator(cpu=True), folder, {})
