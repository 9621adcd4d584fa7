"""Pretraining token shards: build them from raw text, read them as fixed-length windows, check them at training.

    build_pretrain_shards(["corpus/*.parquet"], "data/pretrain", tokenizer_dir=None, val_fraction=0.01)
    ds = PretrainDataset("data/pretrain", seq_len=512)      # ds[i] -> {"input_ids", "labels"}: LongTensor[512]

Notable choices:
- Documents are encoded in large batches with the Rust `encode_batch` (all cores; `encode_batch_fast` measured no
  faster here) while a reader thread streams the next batch from disk, so the whole build runs at close to raw
  tokenizer speed (`scripts/bench_data.py`).
- Every document is followed by `<|endoftext|>`; shards are flat `uint16` (or `uint32` for vocabularies over
  65,536) token files, `<split>_<index>.bin`, each at most `shard_tokens` tokens; `manifest.json` describes them.
- The validation split takes every k-th document (k = 1 / val_fraction), spread evenly over all sources.
- `PretrainDataset` memory-maps the shards and treats them as one token stream cut into windows of `seq_len`
  tokens every `stride` tokens (default `seq_len`: no overlap, each token seen once per epoch; the seed used
  `stride = 0.9 * seq_len`). Labels equal input_ids: the model shifts. Shuffling and resuming belong to
  `ResumableSampler`, so the dataset itself is a pure function of the index.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from minillm.data.manifest import (
    FORMAT_VERSION,
    PRETRAIN_FORMAT,
    SFT_FORMAT,
    atomic_output_dir,
    check_file_tokens,
    malformed_manifest_is_user_error,
    read_manifest,
    token_dtype,
    too_few_for_validation,
    validation_picks,
    write_json,
)
from minillm.data.sources import Source, iter_text_batches, resolve_inputs
from minillm.errors import UserError

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
ENCODE_BATCH_CHARS = 4_000_000  # characters per encode call: large enough to keep every core busy


def _prefetch(iterator: Iterator, depth: int = 4) -> Iterator:
    """Run `iterator` in a background thread (reading/decoding overlaps encoding); re-raise its errors here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        """Hand an item over unless the consumer has gone (then never block forever)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer, which raises it
            put(err)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _text_batches(sources: list[Source], text_column: str, on_bytes) -> Iterator[list[str]]:
    """Regroup the sources' documents into batches of about ENCODE_BATCH_CHARS characters."""
    pending: list[str] = []
    chars = 0
    for source in sources:
        for batch in iter_text_batches(source, text_column, on_bytes=on_bytes):
            pending.extend(batch)
            chars += sum(len(t) for t in batch)
            if chars >= ENCODE_BATCH_CHARS:
                yield pending
                pending, chars = [], 0
    if pending:
        yield pending


class _ShardWriter:
    """Appends token arrays to `<split>_<k>.bin` files of at most `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.files: list[dict] = []
        self.handle = None
        self.in_shard = 0
        self.tokens = 0
        self.documents = 0

    def write(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        self.tokens += len(tokens)
        start = 0
        while start < len(tokens):
            if self.handle is None or self.in_shard >= self.shard_tokens:
                self._next_file()
            take = min(len(tokens) - start, self.shard_tokens - self.in_shard)
            tokens[start : start + take].tofile(self.handle)
            self.in_shard += take
            self.files[-1]["tokens"] += take
            start += take

    def _next_file(self) -> None:
        if self.handle is not None:
            self.handle.close()
        name = f"{self.split}_{len(self.files):05d}.bin"
        self.handle = open(self.directory / name, "wb")
        self.files.append({"name": name, "tokens": 0})
        self.in_shard = 0

    def close(self) -> dict:
        if self.handle is not None:
            self.handle.close()
        return {"files": self.files, "tokens": self.tokens, "documents": self.documents}


def _progress(enabled: bool):
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from minillm.progress import stderr_progress

    return stderr_progress(  # gone when done: the summary line (or a one-line error) follows
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tokens]} tokens"),
        enabled=enabled,
    )


def build_pretrain_shards(
    inputs: list[str] | str,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    text_column: str = "text",
    val_fraction: float = 0.0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    progress: bool = True,
    extra_manifest: dict | None = None,
) -> dict:
    """Tokenize `inputs` (files, globs, dirs or an HF name) into token shards in `out_dir`; return the manifest.

    `tokenizer_dir=None` uses the shipped default tokenizer. Raises `UserError` for bad input, leaving no output.
    """
    from minillm.tokenizer import load_tokenizer, tokenizer_fingerprint

    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if shard_tokens <= 0:
        raise UserError(f"--shard-tokens {shard_tokens}: must be positive")
    sources = resolve_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_dir)
    # Text that spells a special token ("<|endoftext|>" in a page about tokenizers) is encoded as its characters,
    # never as the control token: an EOS inside a document would split it and miscount the documents.
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    eos_id = tokenizer.eos_token_id
    total_bytes = sum(s.size_bytes for s in sources)
    started = time.perf_counter()

    with atomic_output_dir(out_dir, PRETRAIN_FORMAT, overwrite) as tmp, _progress(progress) as bar:
        task = bar.add_task("tokenizing", total=total_bytes or None, tokens=0)
        writers = {"train": _ShardWriter(tmp, "train", dtype, shard_tokens)}
        if val_fraction > 0:
            writers["val"] = _ShardWriter(tmp, "val", dtype, shard_tokens)
        doc_index = 0
        max_id = -1
        n_chars = 0

        def on_bytes(n: int) -> None:
            bar.advance(task, n)

        for texts in _prefetch(_text_batches(sources, text_column, on_bytes)):
            n_chars += sum(len(t) for t in texts)
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            # Split this batch's documents between train and val (every k-th document globally).
            is_val = validation_picks(doc_index, len(encodings), val_fraction)
            doc_index += len(encodings)
            for split, chosen in (("train", ~is_val), ("val", is_val)):
                docs = (
                    encodings
                    if split == "train" and not is_val.any()
                    else [encodings[i] for i in np.flatnonzero(chosen)]
                )
                if not docs:
                    continue
                # One flat array per batch: each document's ids, then <|endoftext|>. `len(enc)` sizes it without
                # building the id lists twice.
                ends = np.cumsum(np.fromiter((len(e) for e in docs), dtype=np.int64, count=len(docs)) + 1)
                flat = np.empty(int(ends[-1]), dtype=dtype)
                pos = 0
                for enc, end in zip(docs, ends.tolist(), strict=True):
                    flat[pos : end - 1] = enc.ids
                    pos = end
                flat[ends - 1] = eos_id
                max_id = max(max_id, int(flat.max()))
                writers[split].write(flat, len(docs))
            bar.update(task, tokens=f"{sum(w.tokens for w in writers.values()):,}")

        if total_bytes:
            bar.update(task, completed=total_bytes)  # parquet progress is estimated from row counts
        splits = {name: w.close() for name, w in writers.items()}
        if doc_index == 0:
            raise UserError(
                f"{', '.join(s.name for s in sources)}: no documents found (column '{text_column}' is empty)"
            )
        if "val" in splits and splits["val"]["documents"] == 0:
            raise too_few_for_validation(val_fraction, doc_index, "documents")
        manifest = {
            "format": PRETRAIN_FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "max_token_id": max_id,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "tokenizer": str(tokenizer.name_or_path),
            "text_column": text_column,
            "val_fraction": val_fraction,
            "characters": n_chars,
            "documents": doc_index,
            "tokens": sum(s["tokens"] for s in splits.values()),
            "splits": splits,
            "sources": [{"path": s.name, "bytes": s.size_bytes} for s in sources],
            "seconds": round(time.perf_counter() - started, 2),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra_manifest or {}),
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


def load_pretrain_manifest(directory: str | Path) -> dict:
    """Read a shard directory's manifest and check every shard's size against it."""
    directory = Path(directory)
    manifest = read_manifest(directory, PRETRAIN_FORMAT)
    with malformed_manifest_is_user_error(directory):
        dtype = np.dtype(manifest["dtype"])
        for split in manifest["splits"].values():
            for f in split["files"]:
                check_file_tokens(directory / f["name"], int(f["tokens"]), dtype)
    return manifest


class PretrainDataset:
    """Fixed-length windows over the memory-mapped token shards of one split (a map-style torch dataset)."""

    def __init__(
        self, directory: str | Path, seq_len: int, split: str = "train", stride: int | None = None
    ) -> None:
        self.directory = Path(directory)
        self.manifest = load_pretrain_manifest(self.directory)
        if split not in self.manifest["splits"]:
            found = ", ".join(self.manifest["splits"])
            hint = " (build with --val-fraction to get one)" if split == "val" else ""
            raise UserError(f"{self.directory}: no '{split}' split (splits found: {found}){hint}")
        if seq_len < 2:
            raise UserError(f"seq_len {seq_len} must be at least 2")
        self.seq_len = seq_len
        self.stride = seq_len if stride is None else stride
        if self.stride < 1:
            raise UserError(f"stride {stride} must be positive")
        self.dtype = np.dtype(self.manifest["dtype"])
        files = [f for f in self.manifest["splits"][split]["files"] if f["tokens"] > 0]
        self.paths = [self.directory / f["name"] for f in files]
        self.starts = np.cumsum([0] + [f["tokens"] for f in files])  # global offset of each shard
        self._shards: list[np.memmap] | None = None
        self.total_tokens = int(self.starts[-1])
        if self.total_tokens < seq_len:
            hint = "; rebuild it with a larger --val-fraction (minillm data pretrain), or 0 for none" if split == "val" \
                else ""
            raise UserError(
                f"{self.directory}: the '{split}' split has {self.total_tokens} tokens, fewer than seq_len {seq_len}"
                + hint
            )
        self.num_windows = (self.total_tokens - seq_len) // self.stride + 1

    def __len__(self) -> int:
        return self.num_windows

    @property
    def shards(self) -> list[np.memmap]:
        """Memory maps, opened lazily in each process (DataLoader workers never pickle the token data)."""
        if self._shards is None:
            self._shards = [np.memmap(p, dtype=self.dtype, mode="r") for p in self.paths]
        return self._shards

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None}

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's stream (its shards back to back), cut at the stream's end:
        what evaluation reads to score every token, the last partial window included."""
        return self._slice(start, min(length, self.total_tokens - start))

    def _slice(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the concatenated shards (a window may span two shards)."""
        parts = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.starts[k])
            take = min(length, len(self.shards[k]) - offset)
            parts.append(self.shards[k][offset : offset + take])
            start, length, k = start + take, length - take, k + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, index: int) -> dict:
        import torch

        if not -self.num_windows <= index < self.num_windows:
            raise IndexError(f"window {index} out of range ({self.num_windows} windows)")
        index %= self.num_windows
        ids = torch.from_numpy(self._slice(index * self.stride, self.seq_len).astype(np.int64))  # (seq_len,)
        return {"input_ids": ids, "labels": ids.clone()}


def check_shards_match(
    manifest: dict | str | Path,
    tokenizer=None,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    model_max_len: int | None = None,
    scan: bool = True,
) -> None:
    """Refuse (UserError) token data that does not fit the tokenizer / model the trainer is about to use.

    Checks: shard sizes against the manifest; the tokenizer fingerprint against `tokenizer` (if given); every
    token id < `vocab_size` (the model's embedding rows; the manifest's recorded maximum, then the data itself when
    `scan`); `max_seq_len <= model_max_len`. `manifest` is a data directory (pretraining or SFT) or its manifest
    dict with a `"directory"` key.
    """
    from minillm.tokenizer import tokenizer_fingerprint

    if isinstance(manifest, (str, Path)):
        directory = Path(manifest)
        manifest = read_manifest(directory, (PRETRAIN_FORMAT, SFT_FORMAT))
    else:
        directory = Path(manifest.get("directory", "."))
    dtype = np.dtype(manifest["dtype"])
    files = [f for split in manifest["splits"].values() for f in split["files"]]
    for f in files:
        check_file_tokens(directory / f["name"], f["tokens"], dtype)
    if tokenizer is not None:
        theirs = tokenizer_fingerprint(tokenizer)
        if manifest.get("tokenizer_fingerprint") != theirs:
            raise UserError(
                f"{directory}: built with tokenizer {manifest.get('tokenizer')} (fingerprint "
                f"{manifest.get('tokenizer_fingerprint')}), but this command uses {getattr(tokenizer, 'name_or_path', '?')} "
                f"(fingerprint {theirs}); rebuild the data with this tokenizer"
            )
    if vocab_size is not None:
        if manifest.get("max_token_id", -1) >= vocab_size:
            raise UserError(
                f"{directory}: holds token id {manifest['max_token_id']} but the model's vocab_size is {vocab_size}"
            )
        if scan:
            for f in files:
                data = np.memmap(directory / f["name"], dtype=dtype, mode="r")
                for start in range(0, len(data), 50_000_000):
                    top = int(data[start : start + 50_000_000].max()) if len(data) else -1
                    if top >= vocab_size:
                        raise UserError(
                            f"{directory / f['name']}: holds token id {top} but the model's vocab_size is {vocab_size}"
                        )
    if max_seq_len is not None and model_max_len is not None and max_seq_len > model_max_len:
        raise UserError(
            f"max_seq_len {max_seq_len} is larger than the model's maximum ({model_max_len} positions)"
        )
    if model_max_len is not None and manifest.get("max_seq_len") and manifest["max_seq_len"] > model_max_len:
        raise UserError(
            f"{directory}: built with max_seq_len {manifest['max_seq_len']}, larger than the model's maximum "
            f"({model_max_len} positions)"
        )
