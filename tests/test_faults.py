"""Faults through the real `accelerate launch`: SIGKILL mid-training, SIGKILL while a checkpoint is being written,
and one rank of two killed. Resume never picks a partial checkpoint and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import LAUNCH, ROOT, TWO_RANKS, run

STEPS = ["max_steps=12", "checkpoint_every=4", "keep_checkpoints=3", "sample_every=1000", "log_every=4"]
# Loaded by every Python process whose path holds this folder: SIGKILL the process at the rename that would
# complete checkpoint step 8, so the run dies with that checkpoint fully written under its temporary name.
KILL_AT_RENAME = """
import os, signal
_replace = os.replace
def _replace_or_die(src, dst, *args, **kwargs):
    if os.path.basename(str(src)).startswith(".tmp-step-00000008-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *args, **kwargs)
os.replace = _replace_or_die
"""


def _train_args(emoji_dir: Path, autoencoder_dir: Path, output_dir: Path) -> list[str]:
    return ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"data={emoji_dir}",
            f"autoencoder={autoencoder_dir}", f"output_dir={output_dir}", *STEPS]


def _env(**extra: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            **extra}


def _start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"run ended before {path.name} appeared:\n{process.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.2)


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / "unet" / "diffusion_pytorch_model.safetensors")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # 75-95 s: CI's second stage
def test_sigkill_mid_training_and_during_a_checkpoint_resume_bit_identically(emoji_dir, autoencoder_dir, tmp_path):
    straight = tmp_path / "straight"
    run(LAUNCH + _train_args(emoji_dir, autoencoder_dir, straight))
    expected = _final_weights(straight)

    killed = tmp_path / "killed"
    process = _start(LAUNCH + _train_args(emoji_dir, autoencoder_dir, killed))
    _wait_for(killed / "checkpoints" / "step-00000004" / "trainer_state.json", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    resumed = run(LAUNCH + _train_args(emoji_dir, autoencoder_dir, killed))
    assert "resumed from" in resumed.stderr
    _assert_same(_final_weights(killed), expected)

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AT_RENAME)
    mid_write = tmp_path / "mid-write"
    died = run(LAUNCH + _train_args(emoji_dir, autoencoder_dir, mid_write), check=False,
               env={"PYTHONPATH": str(hook)})
    assert died.returncode != 0
    # written under its unique temporary name, never renamed
    assert [p.name[:len(".tmp-step-00000008-")] for p in (mid_write / "checkpoints").glob(".tmp-*")] == \
        [".tmp-step-00000008-"]
    assert not (mid_write / "checkpoints" / "step-00000008").exists()
    resumed = run(LAUNCH + _train_args(emoji_dir, autoencoder_dir, mid_write))
    assert "step-00000004 at step 4" in resumed.stderr  # the last complete checkpoint, not the partial one
    _assert_same(_final_weights(mid_write), expected)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow  # a 2-rank run killed and resumed: CI's second stage (2-rank training: test_train_ldm.py)
def test_killing_one_of_two_ranks_stops_the_other_and_resume_skips_partial_work(emoji_dir, autoencoder_dir,
                                                                                  tmp_path):
    out = tmp_path / "ddp"
    launch = TWO_RANKS + ["--num_cpu_threads_per_process", "1"]
    args = _train_args(emoji_dir, autoencoder_dir, out) + ["ddp_timeout_minutes=1"]
    process = _start(launch + args, ACCELERATE_USE_CPU="1")
    _wait_for(out / "checkpoints" / "step-00000004" / "trainer_state.json", process)
    ranks = [pid for pid in _children(process.pid)
             if "train_ldm.py" in Path(f"/proc/{pid}/cmdline").read_text(errors="ignore")]
    assert len(ranks) == 2, ranks
    os.kill(max(ranks), signal.SIGKILL)
    start = time.monotonic()
    returncode = process.wait(timeout=120)
    assert returncode != 0 and time.monotonic() - start < 90  # within the configured timeout (1 min) and then some
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
               for pid in ranks)
    complete = [p.name for p in sorted((out / "checkpoints").iterdir()) if (p / "trainer_state.json").is_file()
                and not p.name.startswith(".tmp-")]
    resumed = run(launch + args, env={"ACCELERATE_USE_CPU": "1"})
    assert f"resumed from {out / 'checkpoints' / complete[-1]} at step" in resumed.stderr
    assert (out / "checkpoints" / "step-00000012" / "trainer_state.json").is_file()


def _mount_tmpfs(path: Path, megabytes: int) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow  # about a minute: CI's second stage
@pytest.mark.parametrize("fault", ["full disk", "file size limit"])
def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one_and_says_why(emoji_dir, autoencoder_dir, tmp_path,
                                                                            fault):
    """Real writes that fail: a small tmpfs filled up (ENOSPC; needs the right to mount, as root in CI), or a file
    size limit (EFBIG; torch and safetensors raise their own error types for both). The run stops with one line,
    no partial folder is left, the last checkpoint is intact and a later resume goes on from it."""
    volume = tmp_path / "volume"
    if fault == "full disk" and not _mount_tmpfs(volume, 256):
        pytest.skip("mounting a tmpfs needs root (CI runs as root); the file size limit case covers the rest")
    volume.mkdir(exist_ok=True)
    try:
        output_dir = volume / "run"
        common = ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"data={emoji_dir}",
                  f"autoencoder={autoencoder_dir}", f"output_dir={output_dir}", f"cache_dir={tmp_path / 'cache'}",
                  "checkpoint_every=2", "sample_every=1000", "log_every=1"]
        run(LAUNCH + common + ["max_steps=2"])
        first = output_dir / "checkpoints" / "step-00000002"
        before = {p.name: p.read_bytes() for p in first.iterdir()}
        if fault == "full disk":
            free = shutil.disk_usage(volume).free
            (volume / "filler").write_bytes(b"\0" * (free - 300_000))  # room for logs and a sample, not a checkpoint
            failed = run(LAUNCH + common + ["max_steps=4"], check=False)
        else:  # the optimiser state (about 2 MB) is over the limit; logs, samples and the U-Net file are under it
            failed = run(["bash", "-c", 'ulimit -f 1500 && exec "$@"', "bash", *LAUNCH, *common, "max_steps=4"],
                         check=False)
        assert failed.returncode != 0
        assert "could not write the checkpoint of step 4" in failed.stderr, failed.stderr[-3000:]
        assert "resume=auto continues from step-00000002, which is intact" in failed.stderr
        assert [p.name for p in (output_dir / "checkpoints").iterdir()] == ["step-00000002"]  # no partial folder
        assert {p.name: p.read_bytes() for p in first.iterdir()} == before
        (volume / "filler").unlink(missing_ok=True)
        resumed = run(LAUNCH + common + ["max_steps=4"])
        assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
        assert (output_dir / "checkpoints" / "step-00000004" / "trainer_state.json").is_file()
    finally:
        if fault == "full disk":
            subprocess.run(["umount", str(volume)], capture_output=True)


@pytest.mark.slow  # about 20 s: CI's second stage
def test_a_second_run_on_the_same_output_dir_stops_and_names_the_first(emoji_dir, autoencoder_dir, tmp_path):
    output_dir = tmp_path / "run"
    first = _start(LAUNCH + _train_args(emoji_dir, autoencoder_dir, output_dir) + ["max_steps=100000"])
    try:
        _wait_for(output_dir / ".lock", first)
        time.sleep(0.5)  # the lock file is created, then its holder written
        holder = json.loads((output_dir / ".lock").read_text())
        second = run(LAUNCH + _train_args(emoji_dir, autoencoder_dir, output_dir), check=False)
        assert first.poll() is None  # the first run was still going, and its files are its own
        assert second.returncode != 0
        assert f"is in use by process {holder['pid']} on {holder['host']}" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
