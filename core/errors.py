"""User mistakes as exceptions that entry points print as one clear line instead of a traceback.

`UserError` is a `ValueError` (callers catch bad arguments as they do with diffusers) and `MissingFileError` also a
`FileNotFoundError`.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(ValueError):
    """A mistake the user can fix (bad path, bad config value, missing model). The message names the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a model folder needs) is not there."""


def exit_on_user_error(fn: F) -> F:
    """Wrap a command-line entry point: a `UserError` becomes one `error: ...` line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            logging.getLogger(fn.__module__).debug("user error", exc_info=True)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
