"""`ldm serve` in a subprocess and the system's headless Chromium, for the page's browser tests and benchmark.

Chromium comes from the distribution (`apt-get install chromium`); Playwright drives it by path and downloads
nothing. The flags keep it from calling out: this machine's network is closed, and background requests time out.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    """The system Chromium, or None when it (or Playwright) is not installed."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None
    path = shutil.which("chromium") or "/usr/bin/chromium"
    return path if Path(path).is_file() else None


def launch_chromium(playwright):
    """The system Chromium, headless, through a started Playwright (`sync_playwright()`), with the offline flags."""
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(log: str | Path, *args: str, timeout_s: float = 180) -> Iterator[str]:
    """`ldm serve ARGS` on a free loopback port, as a user starts it; yields its URL once it answers."""
    port = free_port()
    with open(log, "w") as out:  # `ldm serve` turns Gradio's analytics off itself
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port), *args], stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ldm serve exited: {Path(log).read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"ldm serve did not answer in {timeout_s} s: {Path(log).read_text()[-2000:]}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
