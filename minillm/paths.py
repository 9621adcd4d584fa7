"""Checks on output paths before any work is done: a bad one is a one-line `UserError`, never a traceback after
minutes of training or evaluation, and never a half-written output."""

from __future__ import annotations

import os
from pathlib import Path

from minillm.errors import UserError


def check_creatable(path: str | os.PathLike, option: str = "output") -> None:
    """Raise `UserError` unless `path` can be created (or replaced) by this process: its nearest existing ancestor
    must be a writable directory. Writes nothing."""
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{option} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: no permission to write in {ancestor}")


def make_parent_dirs(path: str | os.PathLike, option: str = "output") -> None:
    """Create the directories above `path`; a `UserError` (one line) when the system refuses."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{option} {path}: cannot create {path.parent} ({err.strerror or err})") from None


def check_not_working_directory(path: str | os.PathLike, option: str = "output") -> None:
    """Raise `UserError` when `path` is the working directory or holds it: outputs written beside their target
    and renamed into place (data, export, tokenizer) cannot replace the directory the process (and the user's
    shell) stands in."""
    resolved, cwd = Path(path).resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(f"{option} {path}: is the working directory or holds it; name a new directory")
