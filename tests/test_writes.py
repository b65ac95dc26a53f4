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


def test_a_second_writer_stops_with_the_first_ones_name_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    from core.locks import _start_time

    path = tmp_path / "run" / LOCK_NAME
    with FileLock(path, "output_dir run"):
        assert resolve_resume(tmp_path / "run", "never") is None  # the lock file is not a run's content
    assert not path.exists()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another live process
    try:
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid,
                                    "started": _start_time(other.pid)}))
        with pytest.raises(UserError, match=f"output_dir run is in use by process {other.pid} on "
                                            f"{socket.gethostname()}"):
            FileLock(path, "output_dir run").acquire()
    finally:
        other.kill()
        other.wait()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(finished.stdout), "started": "1"}))
    with FileLock(path, "output_dir run"):  # its holder is gone: taken over
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in caplog.text
    path.write_text(json.dumps({"host": "another-machine", "pid": 1}))
    with pytest.raises(UserError, match="delete that file if no such run is active"):
        FileLock(path, "output_dir run").acquire()  # cannot be checked from here: never taken silently


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


def test_a_process_killed_while_taking_a_lock_never_leaves_one_nobody_can_judge(tmp_path):
    """SIGKILL a process that takes and lets go of a lock in a loop, at 40 seeded moments: the next taker always
    gets it at once (a stale record is taken over; an empty or half-written file would block it)."""
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
        with FileLock(path, "cache shard"):  # never "in use by process ?"
            assert json.loads(path.read_text())["pid"] == os.getpid()
