"""Data at scale: WebDataset shards in and out, bad shards and captions, buckets, the batch sampler, the on-disk cache
read row by row, its per-rank and resumable build, and training from shards (one and two ranks, resumed mid-epoch)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.data.batches import BucketBatchSampler
from core.data.buckets import Bucketer, fit_to_bucket, make_buckets, nearest_bucket
from core.data.sources import open_source, prepare
from core.errors import UserError
from dataprep.synthetic import write_synthetic_shards
from helpers import LAUNCH, ROOT, TWO_RANKS, run

TWO_RANKS = TWO_RANKS
CPU = {"ACCELERATE_USE_CPU": "1"}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def wide_shards(tmp_path_factory):
    """96 shapes, a third each 1:1, 2:1 and 1:2, in 4 tar shards of 24."""
    out = tmp_path_factory.mktemp("wide") / "shards"
    write_synthetic_shards(out, 96, size=32, rows_per_shard=24, aspects=(1.0, 2.0, 0.5), image_format="png")
    return f"{out}/{{00000..00003}}.tar"


def _tar(path: Path, members: dict[str, bytes], truncate_at: int | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if truncate_at is not None:
        data = path.read_bytes()
        path.write_bytes(data[:truncate_at])
    return path


def _png(colour=(200, 0, 0), size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _prepare_all(data: str, **kwargs) -> tuple[list, Counter]:
    source, counts, rows = open_source(data, **kwargs), Counter(), []
    bucketer = Bucketer(16, 4, enabled=False)
    for shard in source.shards:
        for row in shard.rows(counts):
            prepared = prepare(row, source.caption_column, ("{caption}",), bucketer, counts)
            if prepared is not None:
                rows.append(prepared)
    return rows, counts


def test_bad_members_and_a_truncated_tar_are_skipped_and_counted(tmp_path):
    good = {"a.png": _png(), "a.txt": b"a red square"}
    _tar(tmp_path / "00000.tar", {**good, "b.png": b"not a png", "b.txt": b"broken image",
                                  "c.png": _png(), "d.png": _png(), "d.txt": b"   ",
                                  "e.png": _png(), "e.txt": b"caf\xe9 latin-1", "f.txt": b"no image",
                                  "g.png": _png(), "g.json": json.dumps({"caption": "from json"}).encode()})
    full = _tar(tmp_path / "full.tar", {f"{i}.{ext}": data for i in range(6)
                                        for ext, data in (("png", _png(size=(64, 64))), ("txt", b"ok"))})
    _tar(tmp_path / "00001.tar", {f"{i}.{ext}": data for i in range(6) for ext, data in
                                  (("png", _png(size=(64, 64))), ("txt", b"ok"))}, truncate_at=full.stat().st_size // 2)
    rows, counts = _prepare_all(f"{tmp_path}/{{00000..00001}}.tar")
    assert [r.captions for r in rows[:2]] == [["a red square"], ["from json"]]
    assert counts["undecodable image"] == 1 and counts["missing or empty caption"] == 2  # c (none) and d (blank)
    assert counts["non-UTF-8 caption"] == 1 and counts["no image member"] == 1
    assert counts["truncated tar file"] == 1 and 2 <= len(rows) - 2 < 6  # the truncated shard's readable part
    with pytest.raises(UserError, match="matches no tar file"):
        open_source(f"{tmp_path}/{{00005..00009}}.tar")
    with pytest.raises(UserError, match="matches no tar file"):
        open_source(f"{tmp_path}/nothing-*.tar")


def _cache_key(data: str) -> str:
    """The cache key of `data`, everything else fixed (weightless stand-ins for the frozen stages)."""
    from ldm.cache import CacheInputs

    text_encoder = torch.nn.Identity()
    text_encoder.max_length = 8
    return CacheInputs(open_source(data), ("{caption}",), Bucketer(16, 4, enabled=False), torch.nn.Identity(),
                       text_encoder).key()


def test_a_tar_shard_edited_at_equal_size_builds_a_new_cache(tmp_path):
    """Tar pads to 10,240-byte records, so an edited caption or a re-encoded image usually keeps the shard's size:
    the key reads its bytes (issue 31). A copy elsewhere, same name and bytes, keeps the key and so its cache."""
    members = {"a.png": _png((200, 0, 0)), "a.txt": b"a red square", "b.png": _png((0, 0, 200)),
               "b.txt": b"a blue square"}
    path = _tar(tmp_path / "00000.tar", members)
    size, key = path.stat().st_size, _cache_key(str(path))
    (tmp_path / "copy").mkdir()
    assert _cache_key(str(Path(shutil.copy(path, tmp_path / "copy")))) == key
    _tar(path, {**members, "a.txt": b"a tan square"})
    caption_key = _cache_key(str(path))
    _tar(path, {**members, "a.txt": b"a tan square", "b.png": _png((0, 0, 180))})
    image_key = _cache_key(str(path))
    assert path.stat().st_size == size and len(_png((0, 0, 180))) == len(members["b.png"])
    assert len({key, caption_key, image_key}) == 3
    assert [r.captions for r in _prepare_all(str(path))[0]] == [["a tan square"], ["a blue square"]]


def test_a_shards_digest_is_read_once_per_version_and_never_trusted_after_a_change(tmp_path, monkeypatch):
    """The record beside the cache spares re-reading a large shard on every run, keyed by its version; an edit at
    equal size with its old mtime put back still changes the ctime, so it is read again."""
    from core.data import sources

    reads = []
    monkeypatch.setattr(sources, "_sha256", lambda path, read=sources._sha256: reads.append(path) or read(path))
    path, record = _tar(tmp_path / "00000.tar", {"a.png": _png(), "a.txt": b"a red square"}), tmp_path / "d.json"
    first = sources.file_digests([path], record)
    assert sources.file_digests([path], record) == first and len(reads) == 2  # just written: not remembered yet
    monkeypatch.setattr(sources, "SETTLED_NS", 0)
    sources.file_digests([path], record)
    assert sources.file_digests([path], record) == first and len(reads) == 3  # remembered from here on
    before = path.stat()
    time.sleep(0.05)  # past a coarse timestamp tick
    with open(path, "r+b") as f:  # in place: the same inode and size
        data = f.read()
        f.seek(data.index(b"a red square"))
        f.write(b"a tan square")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert sources.file_digests([path], record) != first and len(reads) == 4
    assert sources.file_digests([path], None) != first and len(reads) == 5  # without a record: read every time


def test_decoding_in_loader_workers_gives_the_same_cache(autoencoder_dir, tmp_path):
    from accelerate import PartialState

    from cli.training_args import ldm_config
    from recipes.latent_diffusion import LDMTrainer

    write_synthetic_shards(tmp_path / "s", 50, size=32, rows_per_shard=25, aspects=(1.0, 2.0), image_format="png")
    _tar(tmp_path / "s" / "00002.tar", {"a.png": _png(), "a.txt": b"fine", "b.png": b"broken", "b.txt": b"x",
                                        "c.png": _png(), "d.png": _png(), "d.txt": b"last"}, truncate_at=None)
    caches = {}
    for workers in (0, 2):
        config = ldm_config("configs/ldm/tiny.yaml", [f"data={tmp_path}/s/*.tar", f"autoencoder={autoencoder_dir}",
                                                      f"output_dir={tmp_path / str(workers)}", "aspect_buckets=true",
                                                      f"num_workers={workers}"])
        caches[workers] = LDMTrainer(config).build_cache(PartialState(cpu=True))
    serial, parallel = caches[0], caches[2]
    assert len(serial) == len(parallel) == 52 and serial.skipped == parallel.skipped
    assert serial.skipped == {"undecodable image": 1, "missing or empty caption": 1}
    for a, b in zip(sorted(serial.folder.glob("shard-*")), sorted(parallel.folder.glob("shard-*"))):
        x, y = load_file(a), load_file(b)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_shards_written_from_a_folder_read_back_as_the_same_rows(emoji_dir, tmp_path):
    result = run(["ldm", "data", "shards", "--data", str(emoji_dir), "--out", str(tmp_path / "s"),
                  "--rows-per-shard", "20"])
    assert "72 images in 4 shards" in result.stdout and "{00000..00003}.tar" in result.stdout
    from_folder, _ = _prepare_all(str(emoji_dir), rows_per_shard=20)
    from_tars, counts = _prepare_all(f"{tmp_path}/s/{{00000..00003}}.tar")
    assert not counts and len(from_tars) == len(from_folder) == 72
    for a, b in zip(from_folder, from_tars):
        assert torch.equal(a.pixels, b.pixels) and a.captions == b.captions
    with pytest.raises(AssertionError, match="is not a shard folder"):  # a second write never replaces the first
        run(["ldm", "data", "shards", "--data", str(emoji_dir), "--out", str(tmp_path / "s")])


def test_a_streamed_dataset_gives_the_same_rows_as_the_loaded_one(emoji_dir):
    loaded, _ = _prepare_all(str(emoji_dir))
    streamed, counts = _prepare_all(str(emoji_dir), streaming=True)
    assert not counts and len(streamed) == len(loaded) == 72
    assert all(torch.equal(a.pixels, b.pixels) and a.captions == b.captions for a, b in zip(loaded, streamed))


def test_buckets_fit_every_image_with_the_least_crop():
    buckets = make_buckets(64, 16)
    assert buckets == [(80, 48), (64, 64), (48, 80)]
    assert all(h * w <= 64 * 64 and h % 16 == 0 and w % 16 == 0 for h, w in buckets)
    assert nearest_bucket(200, 100, buckets) == (48, 80) and nearest_bucket(90, 100, buckets) == (64, 64)
    fitted = fit_to_bucket(Image.new("RGB", (200, 100)), (48, 80))
    assert fitted.image.size == (80, 48) and fitted.original_size == (100, 200) and fitted.crop_top_left == (0, 8)
    fitted = fit_to_bucket(Image.new("RGB", (100, 100)), (48, 80))  # 1:1 into 5:3 crops the height only
    assert fitted.image.size == (80, 48) and fitted.crop_top_left == (16, 0)
    square = Bucketer(64, 16, enabled=False)
    assert square.buckets == [(64, 64)] and square.fit(Image.new("RGB", (200, 100))).image.size == (64, 64)


def test_bucket_sampler_is_deterministic_split_without_overlap_and_resumable():
    bucket_of = torch.tensor([0] * 37 + [1] * 21 + [2] * 9)
    sampler = BucketBatchSampler(bucket_of, 4, seed=3)
    epoch0, again, epoch1 = sampler.epoch_batches(0), BucketBatchSampler(bucket_of, 4, 3).epoch_batches(0), \
        sampler.epoch_batches(1)
    assert epoch0 == again and epoch0 != epoch1 and epoch0 != BucketBatchSampler(bucket_of, 4, 4).epoch_batches(0)
    assert all(len({int(bucket_of[i]) for i in batch}) == 1 and len(batch) == 4 for batch in epoch0)
    assert len(epoch0) == 9 + 5 + 2 and len({i for b in epoch0 for i in b}) == 64  # no image twice in an epoch
    ranks = [BucketBatchSampler(bucket_of, 4, 3, rank, 3) for rank in range(3)]
    split = [list(r) for r in ranks]
    assert [len(s) for s in split] == [len(r) for r in ranks] == [5, 5, 5]
    seen = [i for s in split for b in s for i in b]
    assert len(seen) == len(set(seen)) == 60  # disjoint; only the 16th batch (not a multiple of 3) left out
    ranks[1].set_position(0, skip=2)
    assert list(ranks[1]) == split[1][2:]
    assert list(ranks[1]) == split[1]  # the skip applies once
    with pytest.raises(UserError, match="no bucket holds a full batch"):
        BucketBatchSampler(torch.tensor([0, 0, 1]), 4, 0)


def _train_args(data, autoencoder_dir, output_dir, *extra):
    return ["train_ldm.py", "--config", "configs/ldm/tiny.yaml", f"data={data}", f"autoencoder={autoencoder_dir}",
            f"output_dir={output_dir}", "sample_every=1000", "batch_size=4", *extra]


def test_cache_reads_rows_from_disk_not_the_whole_cache(wide_shards, autoencoder_dir, tmp_path):
    from accelerate import PartialState

    from cli.training_args import ldm_config
    from ldm.cache import CachedLatents
    from recipes.latent_diffusion import LDMTrainer

    config = ldm_config("configs/ldm/tiny.yaml", [f"data={wide_shards}", f"autoencoder={autoencoder_dir}",
                                                  f"output_dir={tmp_path / 'run'}", "aspect_buckets=true"])
    built = LDMTrainer(config).build_cache(PartialState(cpu=True))

    def bytes_read() -> int:
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])

    before = bytes_read()
    cache = CachedLatents(built.folder, 4)
    row = cache[len(cache) // 2]
    text = cache.text_states(row["shard"].view(1), row["caption_ids"][:1])  # one variant, as a step reads it
    used = bytes_read() - before
    on_disk = sum(f.stat().st_size for f in cache.folder.glob("shard-*"))
    row_bytes = (row["latent_mean"].numel() + row["latent_logvar"].numel() + text.numel()) * 2
    assert used < on_disk / 20 and used < 20_000 + row_bytes, (used, on_disk)  # 4 headers, the empty state, one row
    assert all(torch.equal(row[k], built[len(cache) // 2][k]) for k in row)
    assert len(cache) == 96 and {tuple(b) for b in cache.buckets} == {(24, 40), (32, 32), (40, 24)}
    assert row["latent_mean"].shape[1:] in {(12, 20), (16, 16), (20, 12)}
    original = tuple(row["original_size"].tolist())
    assert original in {(32, 32), (23, 45), (45, 23)}


@pytest.mark.slow  # 3 launches: CI's second stage (the sampler's resume: above; the trainer's: test_train_ldm.py)
def test_training_from_shards_with_buckets_resumes_mid_epoch_bit_identically(wide_shards, autoencoder_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("aspect_buckets=true", "checkpoint_every=4", f"cache_dir={tmp_path / 'cache'}")
    run(LAUNCH + _train_args(wide_shards, autoencoder_dir, straight, "max_steps=10", *common))
    run(LAUNCH + _train_args(wide_shards, autoencoder_dir, resumed, "max_steps=6", *common))
    # 22 batches per epoch of 96 images in 3 buckets: the resume at step 4 is mid-epoch
    result = run(LAUNCH + _train_args(wide_shards, autoencoder_dir, resumed, "max_steps=10", *common,
                                      f"resume={resumed / 'checkpoints' / 'step-00000004'}"))
    assert "at step 4" in result.stderr and "building latent/text cache" not in result.stderr  # shared cache reused
    a = load_file(straight / "final/unet/diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "final/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # 3 launches: CI's second stage (worker decoding: above; 2-rank training: test_train_ldm.py)
def test_two_ranks_build_the_same_cache_as_one_and_train_from_shards(wide_shards, autoencoder_dir, tmp_path):
    one = ["cache", "--config", "configs/ldm/tiny.yaml", f"data={wide_shards}", f"autoencoder={autoencoder_dir}",
           "aspect_buckets=true"]
    run(LAUNCH + ["-m", "cli.main", *one, f"output_dir={tmp_path / 'one'}"])
    result = run(TWO_RANKS + ["-m", "cli.main", *one, f"output_dir={tmp_path / 'two'}"], env=CPU)
    assert result.stderr.count("2 of 2 shards on this rank") == 1  # rank 0 logs; rank 1 built the other two
    one_files, two_files = (sorted((tmp_path / d / "cache").glob("*/shard-*")) for d in ("one", "two"))
    assert [f.name for f in one_files] == [f.name for f in two_files] and len(one_files) == 4
    for a, b in zip(one_files, two_files):
        x, y = load_file(a), load_file(b)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    out = tmp_path / "train"
    result = run(TWO_RANKS + _train_args(wide_shards, autoencoder_dir, out, "aspect_buckets=true", "max_steps=4",
                                         "checkpoint_every=4", "num_workers=2",  # workers fetch whole batches
                                         f"cache_dir={tmp_path / 'two' / 'cache'}"), env=CPU)
    assert "building latent/text cache" not in result.stderr and "differ across ranks" not in result.stderr
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["batches_seen"] == 4 and (out / "final" / "unet").is_dir()


@pytest.mark.slow
def test_a_killed_cache_build_keeps_finished_shards_and_builds_only_the_rest(autoencoder_dir, tmp_path):
    data = f"{tmp_path / 'many'}/*.tar"
    write_synthetic_shards(tmp_path / "many", 400, size=32, rows_per_shard=10)
    args = LAUNCH + ["-m", "cli.main", "cache", "--config", "configs/ldm/tiny.yaml", f"data={data}",
                     f"autoencoder={autoencoder_dir}", f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while len(list((tmp_path / "run").glob("cache/*/shard-*"))) < 5 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("cache/*/shard-*")}
    assert 5 <= len(finished) < 40
    for path in finished:
        load_file(path)  # every shard file that exists is complete
    result = run(args)
    assert f"{40 - len(finished)} of 40 shards on this rank ({len(finished)} already built)" in result.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert "400 images in 40 shards" in result.stdout


@pytest.mark.slow
def test_fsdp_shard_grad_op_on_two_cpu_ranks_resumes_bit_identically(emoji_dir, autoencoder_dir, tmp_path):
    fsdp = [LAUNCH[0], "launch", "--config_file", "configs/accelerate/fsdp-cpu-2proc.yaml"]
    common = ("checkpoint_every=3", f"cache_dir={tmp_path / 'cache'}")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(fsdp + _train_args(emoji_dir, autoencoder_dir, straight, "max_steps=6", *common), env=CPU)
    run(fsdp + _train_args(emoji_dir, autoencoder_dir, resumed, "max_steps=4", *common), env=CPU)
    result = run(fsdp + _train_args(emoji_dir, autoencoder_dir, resumed, "max_steps=6", *common,
                                    f"resume={resumed / 'checkpoints' / 'step-00000003'}"), env=CPU)
    assert "at step 3" in result.stderr and "differ across ranks" not in result.stderr
    ddp = tmp_path / "ddp"  # the same run under DDP: FSDP's sharded gradients and optimiser give the same weights
    run([LAUNCH[0], "launch", "--config_file", "configs/accelerate/cpu-2proc.yaml"]
        + _train_args(emoji_dir, autoencoder_dir, ddp, "max_steps=6", *common), env=CPU)
    a, b, c = (load_file(d / "final/unet/diffusion_pytorch_model.safetensors") for d in (straight, resumed, ddp))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow  # 27 s: the slow stage (default-suite budget)
def test_a_cache_shard_that_cannot_be_written_stops_the_build_with_one_line(wide_shards, autoencoder_dir, tmp_path):
    """A real failed write (a file size limit: EFBIG, as a full disk gives ENOSPC): one line naming the shard and the
    free space, no partial file taken as a shard, and the next build completes."""
    args = [LAUNCH[0], "launch", *LAUNCH[2:], "-m", "cli.main", "cache", "--config", "configs/ldm/tiny.yaml",
            f"data={wide_shards}", f"autoencoder={autoencoder_dir}", f"output_dir={tmp_path / 'run'}"]
    failed = run(["bash", "-c", 'ulimit -f 100 && exec "$@"', "bash", *args], check=False)  # 100 KB; a shard is 300
    assert failed.returncode != 0
    assert "could not write cache shard" in failed.stderr and "the finished shards are kept" in failed.stderr
    folder = next((tmp_path / "run" / "cache").iterdir())
    assert not list(folder.glob("shard-*")) and not list(folder.glob(".shard-*.tmp"))
    assert "96 images in 4 shards" in run(args).stdout
