"""Long evaluations keep their results: `metrics.json` is rewritten (atomically) after every row, and a run of the same
evaluation (same model weights, data and settings) started again finds the rows the earlier one finished."""

from __future__ import annotations

import json
from pathlib import Path

from core.files import atomic_write


def save_metrics(path: Path, metrics: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))


def earlier_metrics(path: Path, metrics: dict, fields: tuple[str, ...]) -> dict:
    """The metrics an earlier run left in `path` when it agrees with `metrics` on every one of `fields`, else {}."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return earlier if all(earlier.get(f) == metrics.get(f) for f in fields) else {}
