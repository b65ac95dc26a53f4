"""Safe folder and file writes: a reader (resume, loading, a second process) never sees a half-written folder, two
writers never share a temporary name, and nothing is deleted that this project did not write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from core.errors import UserError


def check_not_nested(target: Path, source: Path) -> None:
    """Refuse to write `target` where it would be, contain or sit inside `source` (the folder being read)."""
    target, source = target.resolve(), source.resolve()
    if target == source:
        relation = "is"
    elif target in source.parents:
        relation = "contains"
    elif source in target.parents:
        relation = "is inside"
    else:
        return
    raise UserError(f"cannot write {target}: it {relation} the source {source}; choose a folder outside it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_folder(final: str | Path, overwrite: bool = False, replaceable: Callable[[Path], bool] | None = None,
                  what: str = "folder") -> Iterator[Path]:
    """Yield a fresh, uniquely named temporary sibling to fill; on success it becomes `final` by a rename, on error
    it is removed and `final` is untouched.

    An existing non-empty `final` is replaced only with `overwrite=True`, and only if `replaceable(final)` says it is
    a `what` this project wrote (a user's folder or a training run is refused, never deleted); the old folder is
    moved aside first and removed only once the new one is in place.
    """
    final = Path(final).resolve()
    if final.exists():
        if not final.is_dir():
            raise UserError(f"{final} exists and is a file; choose a folder name for the {what}")
        if any(final.iterdir()):
            ours = replaceable is not None and replaceable(final)
            if not ours:
                raise UserError(f"{final} exists and is not a {what}; refusing to write into it (choose a new or "
                                "empty folder)")
            if not overwrite:
                raise UserError(f"{final} already holds a {what}; pass overwrite=True (--overwrite) to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the folder it becomes should not be
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = None
    if final.exists() and any(final.iterdir()):
        aside = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, aside)
    os.replace(tmp, final)  # onto a missing or empty folder: one rename
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def atomic_write(final: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a uniquely named temporary sibling file, then rename it onto `final` (one reader never
    sees half a file; two writers never share the temporary)."""
    final = Path(final)
    handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(handle)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final
