"""Checks on output paths before any work is done: a bad one is a one-line `UserError`, never a traceback after
minutes of training or evaluation, and never a half-written output."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from minillm.errors import UserError


def check_creatable(path: str | os.PathLike, option: str = "output") -> None:
    """Raise `UserError` unless `path` can be created (or replaced) by this process: its nearest existing ancestor
    must be a directory this process can create entries in. Checked by creating and removing an empty directory
    there, since permission bits do not tell (root passes every check, yet cannot write in /proc or on a read-only
    mount), so a long job fails before it starts rather than at its end. Leaves nothing behind."""
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{option} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: no permission to write in {ancestor}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".minillm-probe-", dir=ancestor))
    except OSError as err:
        raise UserError(f"{option} {path}: cannot write in {ancestor} ({err.strerror or err})") from None


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


def check_output_file(
    path: str | os.PathLike | None,
    option: str = "--json",
    overwrite: bool = True,
    inputs: Iterable[str | os.PathLike] = (),
) -> None:
    """Before a command's work (an evaluation, a benchmark): `UserError` unless the file `path` (None: none asked
    for) may be written afterwards: it is none of the command's `inputs`, not a directory, an existing file only
    with `overwrite`, and in a place this process can create it. A bad path found after the work would waste it.
    `inputs` may hold directories (a model, a shard directory): no file inside them is written either."""
    if path is None:
        return
    target = Path(path).resolve()
    for name in inputs:
        source = Path(name).resolve()
        if source == target:
            raise UserError(f"{option} {path}: is an input of this command; choose another file")
        if source.is_dir() and source in target.parents:  # a model's config.json, a data set's manifest.json
            raise UserError(f"{option} {path}: is inside {name}, an input of this command; choose another file")
    if target.is_dir():
        raise UserError(f"{option} {path}: is a directory")
    if target.exists() and not overwrite:
        raise UserError(f"{option} {path}: already exists; choose another file or pass --overwrite")
    check_creatable(target, option)


def write_output_file(path: str | os.PathLike, text: str, option: str = "--json") -> None:
    """Write `text` to the file `path` (the output `check_output_file` allowed before the work), creating its missing
    directories, through a temporary file beside it: no half-written file is ever left. An OSError the check could
    not foresee (a read-only file system, a full disk) becomes a one-line `UserError`."""
    path = Path(path)
    make_parent_dirs(path, option)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # opened as usual: the file mode follows the umask
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"{option} {path}: cannot write ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def apply_umask(directory: str | os.PathLike) -> None:
    """Give `directory` and everything under it the modes that a plain `mkdir` / `open` would have given under this
    process's umask. `tempfile.mkdtemp` makes 0700 directories and safetensors writes its files 0600: the model of a
    run, an export or a data set would otherwise be unreadable to the other accounts of a shared machine (a server
    run as another user) however the umask is set. Called on a finished temporary directory before its rename."""
    mask = os.umask(0)
    os.umask(mask)
    root = Path(directory)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
