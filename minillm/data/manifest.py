"""Manifests and safe output directories shared by the pretraining and SFT data builders.

Every built data directory holds a `manifest.json` that says what is inside (format, dtype, vocabulary size,
tokenizer fingerprint, counts, source files). Readers check it before trusting the binary files, and
`check_shards_match` checks it against the tokenizer and model the trainer uses, so ids from another tokenizer
never silently train a model.

Output is written to a hidden temporary directory beside the target and renamed into place at the end: a failed
or interrupted build leaves nothing behind, and an existing directory is replaced only when it is our own data
(it has a manifest) and the caller asked to overwrite.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from minillm.errors import UserError
from minillm.paths import apply_umask, check_creatable, check_not_working_directory, make_parent_dirs

PRETRAIN_FORMAT = "minillm-pretrain-shards"
SFT_FORMAT = "minillm-sft"
FORMAT_VERSION = 1
# The names of the files each builder writes: `--overwrite` replaces a directory holding only these.
OWN_FILES = {
    PRETRAIN_FORMAT: re.compile(r"manifest\.json|\w+_\d+\.bin"),
    SFT_FORMAT: re.compile(r"manifest\.json|summary\.txt|val\.jsonl|(val_)?(input_ids\.bin|loss_mask\.bin|(row|seq)_offsets\.npy)"),
}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else uint32: half the disk and page cache for 32k vocabularies."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, data_format: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block finishes without error.

    An existing non-empty `out` is replaced only with `overwrite`, and only when it is a directory this builder
    wrote (`data_format` in its manifest) holding nothing but the builder's own files: a directory that merely has
    a manifest.json, or pretraining data given to the SFT builder, is refused.
    """
    out = Path(out)
    check_output_dir(out, data_format, overwrite)  # again: the builder checked before its work, but time passed
    created = [d for d in reversed(out.absolute().parents) if not d.exists()]  # outermost first
    make_parent_dirs(out, "--out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with sigterm_exits():
            yield tmp
        apply_umask(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "data")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in reversed(created):  # the parents made for it, innermost first, if still empty
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """While the block runs, SIGTERM (what `kill` and schedulers send) raises SystemExit(143) like Ctrl-C raises
    KeyboardInterrupt, so the cleanup above runs and no half-written temporary directory stays behind; by default
    SIGTERM ends the process on the spot. Only in the main thread, where Python can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:  # None: a handler installed outside Python, which cannot be put back; the default stands in
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def check_output_dir(out: str | Path, data_format: str, overwrite: bool = False) -> None:
    """`UserError` unless a data builder may write `out` (see `atomic_output_dir`); builders call it before they
    read and tokenize, so a refused --out costs nothing."""
    out = Path(out)
    check_not_working_directory(out, "--out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise UserError(f"{out}: already exists; choose another --out or pass --overwrite")
        _check_replaceable(out, data_format)
    check_creatable(out, "--out")


def _check_replaceable(out: Path, data_format: str) -> None:
    """`UserError` unless `out` is a data directory of `data_format` with only its builder's files in it."""
    if not (out / "manifest.json").is_file():
        raise UserError(f"{out}: exists and is not a minillm data directory (no manifest.json); refusing to replace it")
    try:
        found = json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != data_format:
        raise UserError(f"{out}: holds {found or 'no minillm'} data, not {data_format}; refusing to replace it")
    others = sorted(p.name for p in out.iterdir() if not OWN_FILES[data_format].fullmatch(p.name))
    if others:
        raise UserError(f"{out}: also holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, which "
                        "the data builder did not write; refusing to replace it")


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_manifest(directory: str | Path, expected_format: str | tuple[str, ...]) -> dict:
    """Load and sanity-check `directory/manifest.json`; errors name the directory and the problem."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if directory.is_file():
        raise UserError(f"{directory}: a file, not a data directory (build one with `minillm data ...`)")
    if not directory.is_dir():
        raise UserError(f"{directory}: data directory does not exist")
    if not path.is_file():
        raise UserError(f"{directory}: no manifest.json (build it with `minillm data ...`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a manifest (a JSON object); rebuild the data with `minillm data ...`")
    expected = (expected_format,) if isinstance(expected_format, str) else expected_format
    if manifest.get("format") not in expected:
        raise UserError(
            f"{path}: format is {manifest.get('format')!r}, expected {' or '.join(map(repr, expected))}"
        )
    manifest["directory"] = str(directory)  # in memory only: lets checks name the files
    return manifest


@contextlib.contextmanager
def malformed_manifest_is_user_error(directory: str | Path) -> Iterator[None]:
    """Turn a manifest field that is missing or of the wrong type (a hand-edited or truncated-then-repaired file)
    into one line naming the file, where reading it would raise KeyError, TypeError and the like."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        reason = f"no field {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise UserError(f"{Path(directory) / 'manifest.json'}: malformed ({reason}); rebuild the data with "
                        "`minillm data ...`") from None


def validation_picks(first: int, count: int, val_fraction: float) -> np.ndarray:
    """Which of the items numbered `first` .. `first + count - 1` the validation split takes: bool (count,).

    Every k-th item (k = 1 / val_fraction), spread evenly over the whole input: item i when floor((i + 1) * f) >
    floor(i * f). Both data builders use it, so a held-out document or conversation is chosen the same way."""
    index = np.arange(first, first + count)
    return ((index + 1) * val_fraction).astype(np.int64) > (index * val_fraction).astype(np.int64)


def too_few_for_validation(val_fraction: float, count: int, items: str) -> UserError:
    """The error for a validation split that took none of `count` `items`: how many it needs at this fraction."""
    needed = max(1, int(1 / val_fraction) - 1)
    while not validation_picks(0, needed, val_fraction).any():  # the rule above, not 1 / f's rounding, decides
        needed += 1
    return UserError(f"--val-fraction {val_fraction}: too few {items} ({count:,}) for a validation split: it needs "
                     f"at least {needed:,} at this fraction (give a larger one, or 0 for no split)")


def check_file_tokens(path: Path, expected_tokens: int, dtype: np.dtype) -> None:
    """The file must hold exactly the number of tokens the manifest says (catches truncated copies)."""
    if not path.is_file():
        raise UserError(f"{path}: listed in the manifest but missing")
    size = path.stat().st_size
    if size != expected_tokens * dtype.itemsize:
        raise UserError(
            f"{path}: manifest says {expected_tokens} tokens ({expected_tokens * dtype.itemsize} bytes of {dtype.name}) "
            f"but the file has {size} bytes"
        )
