"""The built-in sample: token data built on first use from the text shipped in `minillm/assets/sample/`.

    shards = builtin_pretrain_shards()                      # default tokenizer, ~/.cache/minillm/builtin/...
    sft = builtin_sft_dataset(max_seq_len=512, pack=True)

The sample (`pretrain.jsonl`, `sft.jsonl`, written by `scripts/make_sample_data.py`, no third-party text) is small
enough to tokenize in seconds, so it is not shipped as tokens. The built directories are cached under
`cache_dir/<tokenizer fingerprint>/` and rebuilt only when the tokenizer or the sample changes (the manifest
records the sample's hash). Several processes building at once (multi-GPU runs) is safe: each writes a temporary
directory and renames it; the loser of the race keeps the winner's copy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from minillm.data.manifest import read_manifest
from minillm.errors import UserError

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "sample"
PRETRAIN_SAMPLE = SAMPLE_DIR / "pretrain.jsonl"
SFT_SAMPLE = SAMPLE_DIR / "sft.jsonl"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINILLM_CACHE", Path.home() / ".cache" / "minillm")) / "builtin"


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _cached(directory: Path, fmt: str, sample_hash: str) -> bool:
    if not (directory / "manifest.json").is_file():
        return False
    try:
        return read_manifest(directory, fmt).get("sample_hash") == sample_hash
    except UserError:
        return False


def _build(directory: Path, fmt: str, sample: Path, build) -> Path:
    """Build into `directory` unless an up-to-date copy is there; tolerate a concurrent builder."""
    sample_hash = _file_hash(sample)
    if _cached(directory, fmt, sample_hash):
        return directory
    try:
        build(overwrite=directory.exists(), extra_manifest={"sample_hash": sample_hash})
    except (OSError, UserError):
        if _cached(directory, fmt, sample_hash):  # another process won the race
            return directory
        raise
    return directory


def builtin_pretrain_shards(
    tokenizer_dir: str | Path | None = None, cache_dir: str | Path | None = None
) -> Path:
    """Token shards (train + a 5% val split) of the built-in pretraining sample; returns the directory."""
    from minillm.data.manifest import PRETRAIN_FORMAT
    from minillm.data.pretrain import build_pretrain_shards
    from minillm.tokenizer import tokenizer_dir_fingerprint

    fingerprint = tokenizer_dir_fingerprint(tokenizer_dir)
    directory = Path(cache_dir or default_cache_dir()) / fingerprint / "pretrain"
    return _build(
        directory,
        PRETRAIN_FORMAT,
        PRETRAIN_SAMPLE,
        lambda **kw: build_pretrain_shards(
            str(PRETRAIN_SAMPLE), directory, tokenizer_dir, val_fraction=0.05, progress=False, **kw
        ),
    )


def builtin_sft_dataset(
    tokenizer_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    max_seq_len: int = 512,
    pack: bool = True,
) -> Path:
    """The built-in SFT sample (identity, greetings, arithmetic, ...) tokenized for `max_seq_len`; returns the dir."""
    from minillm.data.manifest import SFT_FORMAT
    from minillm.data.sft import build_sft_dataset
    from minillm.tokenizer import tokenizer_dir_fingerprint

    fingerprint = tokenizer_dir_fingerprint(tokenizer_dir)
    directory = (
        Path(cache_dir or default_cache_dir())
        / fingerprint
        / f"sft_{max_seq_len}_{'packed' if pack else 'padded'}"
    )
    return _build(
        directory,
        SFT_FORMAT,
        SFT_SAMPLE,
        lambda **kw: build_sft_dataset(
            str(SFT_SAMPLE),
            directory,
            tokenizer_dir,
            max_seq_len=max_seq_len,
            pack=pack,
            progress=False,
            **kw,
        ),
    )
