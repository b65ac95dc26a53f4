"""Lock files that keep two processes from writing the same place: a run's output_dir, a shared cache entry.

A kernel lock (flock, through the filelock package) on the lock file: the kernel frees it the moment its holder ends,
however it ends (SIGKILL included), so nobody has to judge whether an old holder is gone, and two takers never both
hold it. (The hand-written lock before it took over "stale" lock files, and a late unlink of a dead holder's file
removed a fresh one, so two processes held it at once: issue 31.) The file stays after release, so every taker
locks the same inode. The holder writes its host, pid, time taken and command into the file, only so that a process
turned away can say who holds it.

Network filesystems: on NFS the client turns flock into a whole-file lock the server arbitrates, which holds across
hosts (the server frees a crashed host's locks in its recovery; NFSv4 once its lease runs out) unless the share is
mounted with `nolock` or `local_lock`; on others (SMB/CIFS, many FUSE mounts) a flock may hold on one host only, so
two hosts could both take it. Share an output_dir or cache_dir between hosts only on NFS. A filesystem without flock
stops with one line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

import filelock

from core.errors import UserError

logger = logging.getLogger(__name__)


def _write_holder(fd: int) -> None:
    """filelock's `on_acquired`: this process's record, written into the lock file it now holds (for messages)."""
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                         "command": shlex.join(sys.argv)[:300]}).encode()
    os.pwrite(fd, record, 0)
    os.ftruncate(fd, len(record))


def _who(holder: dict) -> str:
    """The holder as a message names it."""
    if not holder:
        return "another process"
    return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}, "
            f"running {holder.get('command', '?')}")


class FileLock:
    """`with FileLock(path, what):` holds `path` for this process; `wait` seconds > 0 waits for its holder (polling
    every `poll` seconds), otherwise a UserError names the holder at once. Taking it again in the thread that holds
    it (a notebook cell run again) holds it again, with a warning; other threads wait as other processes do."""

    def __init__(self, path: str | Path, what: str, wait: float = 0.0, poll: float = 1.0) -> None:
        self.path, self.what, self.wait, self.poll = Path(path), what, wait, poll
        self.held = False
        self._lock = filelock.FileLock(self.path, is_singleton=True, on_acquired=_write_holder)

    def holder(self) -> dict:
        """The holder's record, or {}; read a second time when caught half-written (its holder just took it)."""
        for pause in (0.05, 0.0):
            try:
                record = json.loads(self.path.read_text())
                return record if isinstance(record, dict) else {}
            except (OSError, ValueError):
                time.sleep(pause)
        return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._take(0.0):
            if self.wait <= 0:
                raise UserError(f"{self.what} is in use by {_who(self.holder())} (lock file {self.path}); wait for "
                                "it to finish, or stop it")
            logger.info("waiting for %s, held by %s", self.what, _who(self.holder()))
            if not self._take(self.wait):
                raise UserError(f"{self.what} was still in use by {_who(self.holder())} after {self.wait:g} s of "
                                f"waiting (lock file {self.path})")
        if self._lock.lock_counter > 1:
            logger.warning("%s: this process already holds %s (an earlier run in it did not let go); holding it "
                           "again", self.what, self.path)
        self.held = True

    def _take(self, timeout: float) -> bool:
        """One filelock acquire: whether it got the lock within `timeout` seconds."""
        try:
            self._lock.acquire(timeout=timeout, poll_interval=self.poll)
        except filelock.Timeout:
            return False
        except OSError as err:
            hint = ": this filesystem has no file locks; use a local disk or NFS" if err.errno == errno.ENOSYS else ""
            raise UserError(f"cannot lock {self.path} for {self.what} ({err.strerror}){hint}") from err
        return True

    def release(self) -> None:
        if self.held:
            self._lock.release()
            self.held = False

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
