"""Writers never delete what is not theirs: model folders, exports, locks on a run's output_dir."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from cli.main import main as ldm_main
from core.checkpoints import LOCK_NAME, resolve_resume
from core.errors import UserError
from core.files import atomic_folder
from core.locks import FileLock
from pipelines import Pipeline


# Take the lock at argv[1], say so, and keep it until killed.
HOLDER = """import sys, time
sys.path.insert(0, '.')
from core.locks import FileLock
with FileLock(sys.argv[1], 'x'):
    print('held', flush=True)
    time.sleep(60)
"""

# Wait for the moment on stdin, take the lock at argv[1], log enter/exit to argv[2] around the hold, die holding it.
RACER = """import os, signal, sys, time
sys.path.insert(0, '.')
from core.locks import FileLock
print('ready', flush=True)
start = float(sys.stdin.readline())
while time.time() < start:  # every racer leaves at the same moment
    pass
with FileLock(sys.argv[1], 'x', wait=60, poll=0.001):
    with open(sys.argv[2], 'a') as log:
        log.write(f'enter {os.getpid()}\\n')
    time.sleep(0.02)
    with open(sys.argv[2], 'a') as log:
        log.write(f'exit {os.getpid()}\\n')
    os.kill(os.getpid(), signal.SIGKILL)  # dies holding it: every hand-over is a take-over from a killed holder
"""


def test_save_pretrained_refuses_a_user_folder_and_replaces_a_model_folder_only_when_asked(tiny_components,
                                                                                         tmp_path):
    pipe = Pipeline(**tiny_components)
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(UserError, match="exists and is not a model folder; refusing to write into it"):
        pipe.save_pretrained(mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["holiday.jpg"]
    folder = pipe.save_pretrained(tmp_path / "model")
    with pytest.raises(UserError, match="already holds a model folder; pass overwrite=True"):
        pipe.save_pretrained(folder)
    (folder / "marker").write_text("old")
    pipe.save_pretrained(folder, overwrite=True)
    assert not (folder / "marker").exists() and (folder / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]  # nothing left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (pipe.save_pretrained(empty) / "model_index.json").is_file()  # an empty folder is fine


def test_a_failed_write_leaves_the_old_folder_as_it_was(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "model_index.json").write_text("{}")
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_folder(final, overwrite=True, replaceable=lambda p: True) as tmp:
            (tmp / "model_index.json").write_text('{"new": 1}')
            raise RuntimeError("half way")
    assert json.loads((final / "model_index.json").read_text()) == {}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_ldm_export_never_writes_over_or_into_its_source(tiny_model_dir, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000010").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, run_dir / "final")
    (run_dir / "final" / "config.yaml").write_text("text_encoder: minilm\n")
    cases = {str(run_dir): "contains the source", str(run_dir / "final"): "is the source",
             str(run_dir / "final" / "slim"): "is inside the source"}
    for out, message in cases.items():
        with pytest.raises(SystemExit):
            ldm_main(["export", "--model", str(run_dir / "final"), "--out", out, "--overwrite"])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a training output_dir given as the model: its files are the source too
        ldm_main(["export", "--model", str(run_dir), "--out", str(run_dir / "checkpoints" / "x")])
    assert "is inside the source" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "step-00000010").is_dir() and (run_dir / "final" / "unet").is_dir()
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit):  # `--out .` is the current folder, resolved (it was a raw ValueError)
        ldm_main(["export", "--model", str(run_dir), "--out", ".", "--overwrite"])
    assert f"{work} exists and is not a model folder" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "mine"
    ldm_main(["export", "--model", str(run_dir), "--out", "slim", "--dtype", "float32"])
    with pytest.raises(SystemExit):
        ldm_main(["export", "--model", str(run_dir), "--out", "slim"])
    assert "pass overwrite=True (--overwrite)" in capsys.readouterr().err
    ldm_main(["export", "--model", str(run_dir), "--out", "slim", "--overwrite"])
    assert (work / "slim" / "config.yaml").read_text() == "text_encoder: minilm\n"


def test_a_second_writer_stops_with_the_first_ones_name_and_a_killed_holders_lock_is_free_at_once(tmp_path,
                                                                                                   caplog):
    path = tmp_path / "run" / LOCK_NAME
    with FileLock(path, "output_dir run"):
        assert resolve_resume(tmp_path / "run", "never") is None  # the lock file is not a run's content
    assert resolve_resume(tmp_path / "run", "never") is None  # nor is it once let go (it stays, for every taker)
    other = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=os.path.dirname(os.path.dirname(__file__)),
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=f"output_dir run is in use by process {other.pid} on "
                                            f"{socket.gethostname()} since .*, running -c {path} \\(lock file"):
            FileLock(path, "output_dir run").acquire()
        with pytest.raises(UserError, match=f"still in use by process {other.pid} .* after 0.2 s of waiting"):
            FileLock(path, "output_dir run", wait=0.2, poll=0.05).acquire()
    finally:
        other.kill()  # SIGKILL
        other.wait()
    with FileLock(path, "output_dir run"):  # its holder is gone: the kernel let go of its lock
        assert json.loads(path.read_text())["pid"] == os.getpid()
    path.write_text(json.dumps({"host": "another-machine", "pid": 1}))
    with FileLock(path, "output_dir run"):  # a record alone holds nothing: it only names a holder in messages
        again = FileLock(path, "output_dir run")
        again.acquire()  # in the thread that holds it (a notebook cell run again): held twice, with a warning
        assert "this process already holds" in caplog.text
        again.release()
        assert not _free_for_another_thread(path)  # still held by the `with`; other threads wait as processes do
    assert _free_for_another_thread(path)


def _free_for_another_thread(path) -> bool:
    """Whether another thread of this process takes the lock on `path` at once."""
    import threading

    taken = []

    def take() -> None:
        try:
            with FileLock(path, "x"):
                taken.append(True)
        except UserError:
            pass

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    return bool(taken)


def test_two_ldm_generate_writes_to_one_file_leave_one_whole_png(tmp_path):
    from core.files import atomic_write

    out = tmp_path / "same.png"
    from PIL import Image

    for colour in ("red", "blue"):
        atomic_write(out, lambda tmp, c=colour: Image.new("RGB", (4, 4), c).save(tmp, format="PNG"))
    assert np.asarray(Image.open(out))[0, 0].tolist() == [0, 0, 255]
    assert [p.name for p in tmp_path.iterdir()] == ["same.png"]


def test_damaged_model_folders_are_named_in_one_line(tiny_components, tmp_path):
    """Malformed JSON, a truncated weight file without checksums, an edited config under checksums."""
    from pipelines.loading import save_slim_model_folder

    full = Pipeline(**tiny_components).save_pretrained(tmp_path / "full")
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        broken = tmp_path / f"broken-{name.replace('/', '-')}"
        shutil.copytree(full, broken)
        (broken / name).write_text('{"_class_name": ')
        with pytest.raises(UserError, match=f"{broken / name} is not valid JSON"):
            Pipeline(model=broken)
    truncated = tmp_path / "truncated"
    shutil.copytree(full, truncated)
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"cannot load the model in {truncated}"):
        Pipeline(model=truncated)
    pipe = Pipeline(**tiny_components)
    slim = save_slim_model_folder(tmp_path / "slim", pipe.vae, pipe.unet, pipe.scheduler, "minilm", 16)
    checksums = json.loads((slim / "checksums.json").read_text())
    assert {"vae/config.json", "scheduler/scheduler_config.json", "text_encoder.json"} <= checksums.keys()
    Pipeline(model=slim)
    config = json.loads((slim / "vae" / "config.json").read_text())
    (slim / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 1.0}))
    with pytest.raises(UserError, match="vae/config.json is corrupted"):
        Pipeline(model=slim)
    (slim / "checksums.json").write_text("not json")
    with pytest.raises(UserError, match="checksums.json is not valid JSON"):
        Pipeline(model=slim)
    (slim / "checksums.json").unlink()  # a folder without checksums: its JSON is still read with care
    (slim / "text_encoder.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="text_encoder.json should hold a JSON object"):
        Pipeline(model=slim)


def test_a_process_killed_at_any_moment_of_taking_a_lock_leaves_it_free_at_once(tmp_path):
    """SIGKILL a process that takes and lets go of a lock in a loop, at 40 seeded moments: the next taker always
    gets it at once (the kernel frees a dead holder's lock, whatever it was doing) and writes its own record."""
    import random
    import signal
    import time

    path = tmp_path / "shard.lock"
    loop = ("import sys; sys.path.insert(0, '.'); from core.locks import FileLock; print('ready', flush=True)\n"
            f"while True:\n    with FileLock({str(path)!r}, 'x'):\n        pass")
    rng = random.Random(0)
    for _ in range(40):
        taker = subprocess.Popen([sys.executable, "-c", loop], cwd=os.path.dirname(os.path.dirname(__file__)),
                                 stdout=subprocess.PIPE, text=True)
        assert taker.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.02))
        taker.send_signal(signal.SIGKILL)
        taker.wait()
        with FileLock(path, "cache shard"):  # free at once, whatever the killed taker was doing
            assert json.loads(path.read_text())["pid"] == os.getpid()


def test_processes_racing_for_a_killed_holders_lock_hold_it_one_at_a_time(tmp_path):
    """Issue 31: 24 processes take a lock a SIGKILLed process held, all at once, and each is SIGKILLed holding it, so
    every hand-over is a take-over; each writes enter/exit markers around its hold, and they never interleave (with
    stale-lock take-overs, a late unlink of the dead holder's lock removed a fresh one: two or three held it)."""
    import signal
    import time

    root = os.path.dirname(os.path.dirname(__file__))
    path, log = tmp_path / "shard.lock", tmp_path / "holds.log"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=root, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(path), str(log)], cwd=root, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(24)]
    try:
        assert all(r.stdout.readline() == "ready\n" for r in racers)
        start = time.time() + 0.2
        for racer in racers:
            racer.stdin.write(f"{start}\n")
            racer.stdin.flush()
        deadline = time.monotonic() + 60
        while None in [r.poll() for r in racers] and time.monotonic() < deadline:  # each reaped at once (the old
            time.sleep(0.001)                                                     # lock took a zombie for alive)
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    assert [r.returncode for r in racers] == [-signal.SIGKILL] * len(racers)
    lines = log.read_text().split()
    pids = lines[1::2]
    assert lines == [word for pid in pids[::2] for word in ("enter", pid, "exit", pid)], lines
    assert sorted(pids[::2]) == sorted(str(r.pid) for r in racers)
