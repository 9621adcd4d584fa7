"""Perplexity and bits per byte of a causal LM on held-out text.

    minillm eval ppl --model runs/pretrain_mini_llama3_*/final --data heldout.parquet --json ppl.json
    evaluate_perplexity(model, tokenizer, texts, max_seq_len=512, batch_size=8, device=device)   # from Python

Notable choices:
- Bits per byte (bpb) is the number to compare across models: total NLL in nats / ln 2 / UTF-8 bytes of the scored
  text. Every model sees the same bytes whatever its tokenizer, so bpb compares models with different vocabularies;
  per-token loss and perplexity only compare models that share a tokenizer.
- Every token of a document is scored, the first one too: the tokenizer's eos (`<|endoftext|>`, the separator
  that precedes every document in our pretraining shards) is put in front as context. The eos is never a target.
- A document longer than `max_seq_len` is cut into consecutive non-overlapping windows; each window's first input
  is the token before it, so no token is skipped or scored twice. Later windows see less context than a sliding
  window would give them: a slightly pessimistic number, but each token costs one forward position, not L.
- Held-out files are read as `minillm data pretrain` reads training text (`minillm.data.sources`): `.parquet`,
  `.jsonl` and `.json` (one document per row, `text_column`) and `.txt` (documents separated by blank lines);
  suffixes in any case.
- Already-tokenized windows (a validation split of pretraining shards, as the trainer holds, or a shard directory
  given as `--data`) are scored by `evaluate_token_windows`; their bytes come from a per-token byte-length table
  of the byte-level vocabulary, and special tokens (0 bytes, e.g. the `<|endoftext|>` between documents) are not
  scored, as in nanochat. Each window's first token is context only.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm.data.sources import iter_text_batches, local_source
from minillm.errors import UserError
from minillm.evaluation.loading import resolve_max_seq_len
from minillm.evaluation.scoring import progress_bar, sum_nll

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _scores(nll: float, tokens: int, n_bytes: int) -> dict[str, Any]:
    """Loss, perplexity and bits per byte from summed NLL (nats), scored tokens and UTF-8 bytes."""
    loss = nll / tokens
    return {
        "tokens": tokens,
        "bytes": n_bytes,
        "nll": nll,
        "loss": loss,
        "ppl": math.exp(loss),
        "bpb": nll / math.log(2) / n_bytes,
    }


def expand_data_paths(patterns: Sequence[str | Path]) -> list[Path]:
    """Files named by `patterns` (paths, globs, or token shard directories), in order; missing ones are errors."""
    if not patterns:
        raise UserError("--data: give at least one held-out file")
    files: list[Path] = []
    for pattern in patterns:
        pattern = str(pattern)
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"--data {pattern}: the pattern matches no file")
            files.extend(matches)
        else:
            path = Path(pattern)
            if path.is_dir() and not (path / "manifest.json").is_file():
                raise UserError(f"--data {path}: a directory, but not token shards (no manifest.json)")
            if not path.exists():
                raise UserError(f"--data {path}: no such file")
            files.append(path)
    for path in files:
        if not path.is_dir():
            local_source(path, what="--data ")  # one line for a suffix `data pretrain` would not read
    return files


def read_texts(path: Path, text_column: str = "text", limit: int | None = None) -> list[str]:
    """The documents of one held-out file (at most `limit`), read as `minillm data pretrain` reads its inputs
    (`minillm.data.sources.iter_text_batches`): a row of a `.jsonl`/`.json`/`.parquet` file, or a run of lines
    between blank lines of a `.txt` file; blank documents are dropped. So held-out text is cut into
    documents exactly as training text was."""
    texts: list[str] = []
    try:
        for batch in iter_text_batches(local_source(path, what="--data "), text_column, batch_size=256):
            texts.extend(batch)
            if limit is not None and len(texts) >= limit:
                break  # a large held-out file need not be read whole for a quick --limit run
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    return texts[:limit] if limit is not None else texts


def document_windows(
    token_ids: list[int], context_id: int, max_seq_len: int
) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows that score every token of one document exactly once.

    The sequence is `[context_id] + token_ids`; window j feeds positions `[j*L, j*L + k)` and scores the next token
    of each, so targets are the document's tokens `[j*L, j*L + k)`.
    """
    sequence = [context_id, *token_ids]
    windows = []
    for start in range(0, len(token_ids), max_seq_len):
        stop = min(start + max_seq_len, len(token_ids))
        windows.append((sequence[start:stop], sequence[start + 1 : stop + 1]))
    return windows


def evaluate_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_seq_len: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
    description: str = "perplexity",
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of `model` on `texts` (the trainer calls this on its validation split).

    `max_seq_len` is the window length (default: the model's maximum, capped at 2048).

    Returns `documents`, `tokens` (scored), `bytes` (UTF-8 of the scored text), `nll` (total nats), `loss` (nats per
    token), `ppl` (exp(loss)) and `bpb` (bits per byte).
    """
    import torch

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    max_seq_len = resolve_max_seq_len(model, max_seq_len)
    context_id = tokenizer.eos_token_id
    if context_id is None:
        raise UserError("the tokenizer has no eos token to use as the document separator")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else context_id
    device = torch.device(device) if device is not None else next(model.parameters()).device

    texts = [t for t in texts if t]
    encoded = encode_documents(tokenizer, texts, progress)
    windows = [w for ids in encoded for w in document_windows(ids, context_id, max_seq_len)]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if not windows or n_bytes == 0:
        raise UserError("no text to score (every document is empty)")

    was_training = model.training
    model.eval()
    try:
        total = sum_nll(
            model, windows, pad_id, batch_size, device, description=description, progress=progress
        )
    finally:
        model.train(was_training)
    return {"documents": len(texts), **_scores(total.nll, total.tokens, n_bytes)}


ENCODE_BATCH_DOCUMENTS = 1_000  # per tokenizer call: a bar that moves, and Ctrl-C that acts, on large files


def encode_documents(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], progress: bool = True
) -> list[list[int]]:
    """Token ids of each text, in batches under a progress bar (a 50 MB file takes tens of seconds to tokenize).

    split_special_tokens: a document that spells "<|endoftext|>" is scored on those characters, as the data
    builder encodes them, not on a control token."""
    encoded: list[list[int]] = []
    with progress_bar(progress and len(texts) > ENCODE_BATCH_DOCUMENTS) as bar:
        task = bar.add_task("tokenizing", total=len(texts), rate="")
        for start in range(0, len(texts), ENCODE_BATCH_DOCUMENTS):
            batch = list(texts[start : start + ENCODE_BATCH_DOCUMENTS])
            encoded += tokenizer(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            bar.advance(task, len(batch))
    return encoded


def combine(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over several `evaluate_perplexity` results (sums of NLL, tokens and bytes, not a mean of means)."""
    return {
        "documents": sum(r["documents"] for r in results),
        **_scores(sum(r["nll"] for r in results), sum(r["tokens"] for r in results), sum(r["bytes"] for r in results)),
    }


def evaluate_files(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    files: Sequence[Path],
    text_column: str = "text",
    max_seq_len: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    limit: int | None = None,
    progress: bool = True,
    split: str = "val",
) -> dict[str, Any]:
    """`evaluate_perplexity` on each file (`split` of a token shard directory), and the total: `{"max_seq_len": L, "files": [...], "total": {...}}`."""
    max_seq_len = resolve_max_seq_len(model, max_seq_len)
    per_file = []
    for path in files:
        if path.is_dir():
            result = evaluate_shards(
                model, tokenizer, path, split, max_seq_len, batch_size, device, limit, progress
            )
            per_file.append({"file": f"{path}:{split}", **result})
            continue
        texts = read_texts(path, text_column, limit)
        if not texts:
            raise UserError(f"{path}: no non-empty document to score")
        result = evaluate_perplexity(
            model, tokenizer, texts, max_seq_len, batch_size, device, progress=progress, description=path.name
        )
        per_file.append({"file": str(path), **result})
    return {"max_seq_len": max_seq_len, "files": per_file, "total": combine(per_file)}


def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): the printable character standing for each of the 256 bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """UTF-8 bytes each token id stands for; 0 for special tokens.

    Exact for byte-level BPE (every vocabulary entry spells its bytes in the byte alphabet, even a partial UTF-8
    character); other tokenizers fall back to the length of the decoded token.
    """
    alphabet = _byte_alphabet()
    special = set(tokenizer.all_special_ids)
    lengths = []
    for token_id in range(len(tokenizer)):
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token_id in special or token is None:
            lengths.append(0)
        elif all(c in alphabet for c in token):
            lengths.append(len(token))
        else:
            lengths.append(len(tokenizer.decode([token_id]).encode("utf-8")))
    return lengths


def evaluate_token_windows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    windows: Sequence[Sequence[int]],
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
    byte_lengths: list[int] | None = None,
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte on token windows (e.g. `PretrainDataset` items' `input_ids`).

    Each window predicts its tokens 1..n from the ones before; targets that are special tokens are skipped.
    Pass `byte_lengths` (from `token_byte_lengths`) when calling repeatedly, to build the table once.
    """
    import torch

    from minillm.evaluation.scoring import IGNORE_INDEX, sum_nll

    lengths = byte_lengths if byte_lengths is not None else token_byte_lengths(tokenizer)
    sequences, n_bytes = [], 0
    for window in windows:
        ids = [int(t) for t in window]
        targets = [t if lengths[t] > 0 else IGNORE_INDEX for t in ids[1:]]
        n_bytes += sum(lengths[t] for t in ids[1:])
        if any(t != IGNORE_INDEX for t in targets):
            sequences.append((ids[:-1], targets))
    if not sequences:
        raise UserError("no token to score in the windows")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        total = sum_nll(
            model, sequences, pad_id, batch_size, device, description="validation", progress=progress
        )
    finally:
        model.train(was_training)
    return _scores(total.nll, total.tokens, n_bytes)


def evaluate_shards(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    split: str = "val",
    max_seq_len: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`evaluate_token_windows` on one split of a pretraining shard directory (`minillm data pretrain`).

    The shards must come from this model's tokenizer (checked by fingerprint). The split is one token stream; each
    window holds `max_seq_len` + 1 tokens and the next starts on its last one, so every token after the first is
    scored exactly once, the last partial window's included. `limit` caps the number of windows. `documents`
    counts the documents whose end (eos) was scored: the split's count when nothing is cut.
    """
    from minillm.data.pretrain import PretrainDataset, check_shards_match

    max_seq_len = resolve_max_seq_len(model, max_seq_len)
    check_shards_match(directory, tokenizer=tokenizer, vocab_size=model.config.vocab_size)
    stream = PretrainDataset(directory, 2, split=split)  # read as a stream: the window length is not used
    starts = range(0, stream.total_tokens - 1, max_seq_len)
    if limit is not None:
        starts = starts[:limit]
    windows = [stream.tokens(start, max_seq_len + 1).tolist() for start in starts]
    documents = sum(window[1:].count(tokenizer.eos_token_id) for window in windows)
    result = evaluate_token_windows(model, tokenizer, windows, batch_size, device, progress=progress)
    return {"documents": documents, **result}
