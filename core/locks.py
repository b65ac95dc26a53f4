"""Lock files that keep two processes from writing the same place: a run's output_dir, a shared cache entry.

A lock is a file holding its holder's host, pid and process start time, written to a private file first and then
hard-linked into place, so it never exists half-written (a process killed between an O_EXCL create and its write
left an empty lock nobody could judge, and the next run waited on it forever). A lock whose holder is
gone (same host, no such process, or another process under a reused pid) is stale and taken over; a lock held from
another host cannot be checked, so the message says which file to delete if that run is over. Written by hand
because the field's lock libraries (filelock) leave stale-lock detection to the caller.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from core.errors import UserError

logger = logging.getLogger(__name__)

HALF_WRITTEN_AFTER_S = 30.0  # an empty lock file this old was left by a writer killed between create and write


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process that wrote `holder` still runs (assumed yes when it cannot be told)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _start_time(pid)
    return started is None or holder.get("started") in (None, started)  # a reused pid is another process


class FileLock:
    """`with FileLock(path, what):` holds `path` for this process; `wait` seconds > 0 waits for a live holder."""

    def __init__(self, path: str | Path, what: str, wait: float = 0.0, poll: float = 1.0) -> None:
        self.path, self.what, self.wait, self.poll = Path(path), what, wait, poll
        self.held = False

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}
        waited = False
        while True:
            try:
                self._create(me)
            except FileExistsError:
                holder = self.holder()
                if holder == me:  # this process took it and did not let go (e.g. a notebook cell run again)
                    logger.warning("%s: this process already holds %s; taking it again", self.what, self.path)
                    self.path.unlink(missing_ok=True)
                    continue
                if not holder and self._age() > HALF_WRITTEN_AFTER_S:  # a filesystem without links, writer killed
                    logger.warning("taking over the empty lock %s (its writer died before writing it)", self.path)
                    self.path.unlink(missing_ok=True)
                    continue
                if holder and not _alive(holder):
                    logger.warning("taking over the stale lock %s (process %s on %s is gone)", self.path,
                                   holder.get("pid"), holder.get("host"))
                    self.path.unlink(missing_ok=True)
                    continue
                if time.monotonic() < deadline:
                    if not waited:
                        logger.info("waiting for %s, held by process %s on %s", self.what, holder.get("pid", "?"),
                                    holder.get("host", "?"))
                        waited = True
                    time.sleep(self.poll)
                    continue
                raise UserError(f"{self.what} is in use by process {holder.get('pid', '?')} on "
                                f"{holder.get('host', '?')} (lock file {self.path}); wait for it to finish, or "
                                "delete that file if no such run is active") from None
            self.held = True
            return

    def _create(self, me: dict) -> None:
        """Create the lock file with `me` inside, all at once; FileExistsError when another holds it."""
        private = self.path.with_name(f"{self.path.name}.{me['pid']}.{time.monotonic_ns()}")
        private.write_text(json.dumps(me))
        try:
            os.link(private, self.path)  # atomic and exclusive: fails with FileExistsError when taken
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: exclusive create, then write
            handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(handle, "w") as f:
                json.dump(me, f)
        finally:
            private.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
