"""SFT data: chat rows in three formats -> templated, tokenized, label-masked rows (optionally packed).

    build_sft_dataset(["chats.jsonl"], "data/sft", max_seq_len=512, pack=True)
    ds = SFTDataset("data/sft")      # ds[i] -> {"input_ids", "labels"[, "position_ids"]}: LongTensors

Notable choices:
- Formats are recognised per row: `messages` (role/content, roles system/user/assistant, optional
  `reasoning_content` on assistant turns), ShareGPT `conversations` (from/value; human/gpt/system; a top-level
  `system` as in LLaMA-Factory's files), Alpaca (`instruction`, optional `input`, `system` and `history` of
  earlier [instruction, output] pairs, `output`).
- The tokenizer's chat template renders the conversation and, through its `{% generation %}` markers, says which
  tokens are assistant output (`return_assistant_tokens_mask`): labels are the token ids there (assistant content
  and its closing `<|im_end|>`, so the model learns to stop) and -100 everywhere else. An earlier assistant turn
  with reasoning is rendered without it (only the last turn's is shown, as at inference) and is not labelled, so
  the model does not learn to answer without thinking.
- A conversation longer than `max_seq_len` is cut after the last assistant turn that still fits
  (`truncation="turn"`), or dropped (`"drop"`); one whose first answer does not fit is always dropped. Invalid rows
  (bad JSON, unknown role, empty assistant turn, no assistant turn, ...) are skipped and counted; the first reasons
  are kept for the summary.
- On disk: `input_ids.bin` (uint16/uint32), `loss_mask.bin` (uint8, 1 where the label is the token),
  `row_offsets.npy` (row boundaries in the flat stream) and `seq_offsets.npy` (conversation boundaries; equal to
  the row boundaries unless packed). Packed rows hold several conversations (best-fit-decreasing, see
  `packing.py`); their `position_ids` restart at 0 at every conversation and are derived from `seq_offsets`.
- `val_fraction` holds out every k-th kept conversation (k = 1 / val_fraction, the rule of the pretraining shards)
  as the `val` split: the same four files prefixed `val_`, packed like the train rows. The trainer computes
  `val/loss` on it every `--eval-every` steps. The same conversations are written as chats to `val.jsonl` (whole,
  as read, before any truncation), so `minillm eval chat --data <out>/val.jsonl` scores exactly the held-out ones.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from minillm.data.manifest import (
    FORMAT_VERSION,
    SFT_FORMAT,
    atomic_output_dir,
    check_file_tokens,
    check_output_dir,
    malformed_manifest_is_user_error,
    read_manifest,
    token_dtype,
    too_few_for_validation,
    validation_picks,
    write_json,
)
from minillm.data.packing import pack_best_fit_decreasing, padding_ratio
from minillm.data.sources import CHAT_KINDS, iter_rows, resolve_inputs
from minillm.errors import UserError
from minillm.tokenizer import spelled_special_token

TRUNCATION_MODES = ("turn", "drop")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "system": "system",
}
MAX_REASONS = 5
VAL_CHATS = "val.jsonl"  # the val split's conversations as chats (messages), for `minillm eval chat`
TEMPLATE_CHUNK = 2000  # conversations per apply_chat_template call


class InvalidRow(ValueError):
    """A chat row that cannot be used; the message says why, `kind` names the reason for counting."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind or message


def _text(value, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRow(f"{what} is {type(value).__name__}, not a string", "content not a string")
    return value


def _drop_leading_newlines(content: str) -> str:
    """An answer without the blank lines it starts with (up to and including the last newline of its leading
    whitespace, so a code block's indentation stays).

    Why: the template puts the answer right after `<|im_start|>assistant\n`, and the tokenizer joins runs of
    whitespace that end in newlines into one token. An answer starting with "\n" would train the model on a "\n\n"
    token that straddles the prompt, while at inference the prompt ends with its own "\n" token: the model would
    have learned its first step from a token sequence it never sees. (Qwen3's template strips them too.)"""
    leading = re.match(r"\s*[\r\n]", content)
    return content[leading.end() :] if leading else content


def parse_conversation(row) -> list[dict]:
    """Turn one row (messages / ShareGPT / Alpaca) into a list of {"role", "content"[, "reasoning_content"]}."""
    if not isinstance(row, dict):
        raise InvalidRow(f"row is {type(row).__name__}, not an object", "not a chat row")
    # A key holding null does not count: in parquet files and hub datasets every row has every column, so an
    # Alpaca row of a mixed file carries `messages: null` / `conversations: null`.
    if row.get("messages") is not None or row.get("conversations") is not None:
        sharegpt = row.get("messages") is None
        turns = row["conversations"] if sharegpt else row["messages"]
        if not isinstance(turns, (list, tuple)) or not turns:
            raise InvalidRow("'messages'/'conversations' is not a non-empty list")
        messages = []
        if row.get("system") and not (isinstance(turns[0], dict) and "system" in (turns[0].get("role"),
                                                                                   turns[0].get("from"))):
            # ShareGPT files (LLaMA-Factory's layout) keep the system prompt beside the turns
            messages.append({"role": "system", "content": _text(row["system"], "system")})
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise InvalidRow(f"turn {k} is not an object", "turn not an object")
            # as for rows, a key holding null does not count: a parquet column of turns written from both layouts
            # gives every turn all four keys
            turn = {key: value for key, value in turn.items() if value is not None}
            # each turn by its own keys: ShareGPT's from/value, or role/content (also found under "conversations")
            if "from" in turn or ("value" in turn and "content" not in turn) or (sharegpt and "role" not in turn):
                raw_role, content = turn.get("from"), turn.get("value")
                role = SHAREGPT_ROLES.get(str(raw_role).lower()) if raw_role is not None else None
            else:
                raw_role, content = turn.get("role"), turn.get("content")
                role = raw_role if raw_role in ("system", "user", "assistant") else None
            if role is None:
                raise InvalidRow(f"unknown role {raw_role!r} in turn {k}", "unknown role")
            message = {"role": role, "content": _text(content, f"turn {k} content")}
            if role == "assistant" and turn.get("reasoning_content"):
                message["reasoning_content"] = _text(turn["reasoning_content"], f"turn {k} reasoning_content")
            messages.append(message)
    elif "instruction" in row and "output" in row:
        user = _text(row["instruction"], "instruction")
        extra = _text(row.get("input"), "input")
        if extra.strip():
            user = f"{user}\n\n{extra}" if user.strip() else extra
        messages = []
        if row.get("system"):
            messages.append({"role": "system", "content": _text(row["system"], "system")})
        history = row.get("history") or []  # Alpaca's earlier turns: [[instruction, output], ...]
        if not isinstance(history, (list, tuple)) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in history
        ):
            raise InvalidRow("'history' is not a list of [instruction, output] pairs", "bad history")
        for k, (question, answer) in enumerate(history):
            messages += [
                {"role": "user", "content": _text(question, f"history {k} instruction")},
                {"role": "assistant", "content": _text(answer, f"history {k} output")},
            ]
        messages += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(row["output"], "output")},
        ]
    else:
        keys = ", ".join(map(str, row)) or "none"
        raise InvalidRow(
            f"not a chat row (expected messages, conversations or instruction/output; fields: {keys})",
            "not a chat row",
        )
    for k, m in enumerate(messages):
        for field in ("content", "reasoning_content"):
            spelled = spelled_special_token(m.get(field, ""))
            if spelled is not None:  # the template would turn it into the control token: a stop, a forged turn
                raise InvalidRow(f"turn {k} spells the special token {spelled} in its text", "special token in text")
        if m["role"] == "assistant":
            if not m["content"].strip():
                raise InvalidRow(f"empty assistant turn {k}", "empty assistant turn")
            m["content"] = _drop_leading_newlines(m["content"])
    while messages and messages[-1]["role"] != "assistant":  # trailing prompts without answers teach nothing
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRow("no assistant turn")
    return messages


def _turn_cut(mask: list[int], limit: int) -> int:
    """The largest index <= limit right after an assistant segment (its closing <|im_end|>), or 0 if none."""
    best = 0
    for i in range(1, min(limit, len(mask)) + 1):
        if mask[i - 1] and (i == len(mask) or not mask[i]):
            best = i
    return best


def _segment_starts(mask: list[int]) -> list[int]:
    """Where each assistant segment (run of 1s) of `mask` starts."""
    return [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]


def _answers_in(mask: list[int]) -> int:
    """How many assistant segments (runs of 1s) `mask` holds."""
    return len(_segment_starts(mask))


def unlabel_answers_shown_without_reasoning(conversation: list[dict], mask: list[int]) -> list[int]:
    """`mask` without the labels of the earlier assistant turns that have reasoning: the template renders only the
    last turn's reasoning (as at inference, where earlier reasoning is not fed back), so an earlier one appears
    with its answer straight after `<|im_start|>assistant`; trained there, a reasoning model learns to answer
    without thinking. Such turns stay in the context, unlabelled. Segment k of the mask is assistant turn k."""
    answers = [m for m in conversation if m["role"] == "assistant"]
    starts = _segment_starts(mask)
    if len(starts) < 2 or not any(m.get("reasoning_content") for m in answers[: len(starts) - 1]):
        return mask
    mask = list(mask)
    for k, start in enumerate(starts[:-1]):
        if answers[k].get("reasoning_content"):
            end = start
            while end < len(mask) and mask[end]:
                end += 1
            mask[start:end] = [0] * (end - start)
    return mask


def _render_cut(tokenizer, conversation: list[dict], answers: int, max_seq_len: int) -> tuple[list, list]:
    """(ids, mask) of `conversation` cut after its `answers`-th assistant turn, rendered again: the template keeps
    only the last assistant turn's reasoning, so slicing the tokens of the whole conversation would train the
    new last turn without the reasoning it has. Fewer turns if the reasoning makes it too long; ([], []) if none
    fits."""
    ends = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    for count in range(answers, 0, -1):
        out = tokenizer.apply_chat_template(
            conversation[: ends[count - 1] + 1], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        if len(out["input_ids"]) <= max_seq_len:
            return list(out["input_ids"]), list(out["assistant_masks"])
    return [], []


def tokenize_conversations(
    tokenizer, conversations: list[list[dict]], max_seq_len: int, truncation: str = "turn", on_chunk=None,
    kept_from: list[int] | None = None,
):
    """Template and tokenize; return (list of (ids, mask) kept, Counter of outcomes).

    `on_chunk(n)` is called after each chunk of n conversations (progress bars); `kept_from`, when given, receives
    the index in `conversations` of each one kept.
    """
    stats: Counter = Counter()
    kept = []
    for start in range(0, len(conversations), TEMPLATE_CHUNK):
        chunk = conversations[start : start + TEMPLATE_CHUNK]
        out = tokenizer.apply_chat_template(
            chunk, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        for offset, (conversation, ids, mask) in enumerate(
            zip(chunk, out["input_ids"], out["assistant_masks"], strict=True)
        ):
            if len(ids) > max_seq_len:
                cut = _turn_cut(mask, max_seq_len) if truncation == "turn" else 0
                if cut and any(m.get("reasoning_content") for m in conversation):
                    ids, mask = _render_cut(tokenizer, conversation, _answers_in(mask[:cut]), max_seq_len)
                else:
                    ids, mask = ids[:cut], mask[:cut]
                if not ids:
                    stats["dropped_too_long"] += 1
                    continue
                stats["truncated"] += 1
            mask = unlabel_answers_shown_without_reasoning(conversation, mask)
            if not any(mask):
                stats["dropped_no_labels"] += 1
                continue
            kept.append((ids, mask))
            if kept_from is not None:
                kept_from.append(start + offset)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return kept, stats


def build_sft_dataset(
    inputs: list[str] | str,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_seq_len: int = 512,
    pack: bool = False,
    truncation: str = "turn",
    overwrite: bool = False,
    progress: bool = True,
    extra_manifest: dict | None = None,
    val_fraction: float = 0.0,
) -> dict:
    """Build an SFT data directory from chat files (or an HF dataset name); return the manifest (with summary)."""
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn

    from minillm.progress import stderr_progress
    from minillm.tokenizer import load_tokenizer, tokenizer_fingerprint

    if truncation not in TRUNCATION_MODES:
        raise UserError(f"--truncation {truncation!r} must be one of {', '.join(TRUNCATION_MODES)}")
    if max_seq_len < 8:
        raise UserError(f"--max-seq-len {max_seq_len} is too small (at least 8)")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    check_output_dir(out_dir, SFT_FORMAT, overwrite)
    sources = resolve_inputs(inputs, CHAT_KINDS)
    tokenizer = load_tokenizer(tokenizer_dir)
    if not re.search(r"\{%-?\s*generation\s*-?%\}", tokenizer.chat_template or ""):
        raise UserError(
            f"{tokenizer.name_or_path}: the chat template has no {{% generation %}} markers, so assistant tokens "
            "cannot be found for the labels (use minillm's template: minillm.tokenizer.CHAT_TEMPLATE)"
        )
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    started = time.perf_counter()

    conversations: list[list[dict]] = []
    invalid: Counter = Counter()
    reasons: list[str] = []
    rows = 0
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()]
    with stderr_progress(*columns, enabled=progress) as bar:  # gone when done: a summary follows
        task = bar.add_task("reading chats", total=sum(s.size_bytes for s in sources) or None)
        for source in sources:
            for where, row, error in iter_rows(source, on_bytes=lambda n: bar.advance(task, n)):
                rows += 1
                kind = error
                if error is None:
                    try:
                        conversations.append(parse_conversation(row))
                        continue
                    except InvalidRow as err:
                        error, kind = str(err), err.kind
                invalid[kind.split(" (")[0]] += 1
                if len(reasons) < MAX_REASONS:
                    reasons.append(f"{where}: {error}")
    if rows == 0:
        raise UserError(f"{', '.join(s.name for s in sources)}: no rows (empty dataset)")
    if not conversations:
        raise UserError(
            f"{sources[0].name}: none of the {rows} rows is a valid conversation (first: {reasons[0]})"
        )

    with stderr_progress(
        *columns[:2], TextColumn("{task.completed:,}/{task.total:,} conversations"), enabled=progress
    ) as bar:
        task = bar.add_task("templating", total=len(conversations))
        kept_from: list[int] = []
        kept, stats = tokenize_conversations(
            tokenizer, conversations, max_seq_len, truncation, on_chunk=lambda n: bar.advance(task, n),
            kept_from=kept_from,
        )
    if not kept:
        raise UserError(
            f"{sources[0].name}: no conversation is usable at --max-seq-len {max_seq_len} "
            f"({stats['dropped_too_long']} too long, {stats['dropped_no_labels']} without assistant tokens)"
        )

    index = np.arange(len(kept))
    is_val = validation_picks(0, len(kept), val_fraction)
    if val_fraction > 0 and not is_val.any():  # never all of them: below 1 the first item always trains
        raise too_few_for_validation(val_fraction, len(kept), "conversations")
    train = [kept[i] for i in index[~is_val]]
    lengths = [len(ids) for ids, _ in train]

    def rows_of(lengths: list[int]) -> list[list[int]]:  # conversations per row: packed, or one each
        return pack_best_fit_decreasing(lengths, max_seq_len) if pack else [[i] for i in range(len(lengths))]

    unpacked_padding = padding_ratio(lengths, max_seq_len)
    bins = rows_of(lengths)
    packed_padding = padding_ratio(lengths, max_seq_len, bins) if pack else None

    with atomic_output_dir(out_dir, SFT_FORMAT, overwrite) as tmp:
        splits = {"train": _write_split(tmp, "", train, bins, dtype)}
        if is_val.any():
            val = [kept[i] for i in index[is_val]]
            splits["val"] = _write_split(tmp, "val_", val, rows_of([len(ids) for ids, _ in val]), dtype)
            # the same conversations as chats, for `minillm eval chat --data <out>/val.jsonl`: which rows of the
            # input they are depends on the rows skipped and dropped before the split, so no rule can name them
            with open(tmp / VAL_CHATS, "w", encoding="utf-8") as f:
                for i in index[is_val]:
                    f.write(json.dumps({"messages": conversations[kept_from[i]]}, ensure_ascii=False) + "\n")
        total = splits["train"]["tokens"]
        summary = {
            "rows_read": rows,
            "conversations": len(train),
            "invalid_rows": sum(invalid.values()),
            "invalid_by_reason": dict(invalid.most_common()),
            "first_invalid": reasons,
            "truncated": stats["truncated"],
            "dropped_too_long": stats["dropped_too_long"],
            "dropped_no_labels": stats["dropped_no_labels"],
            "rows": len(bins),
            "tokens": total,
            "label_tokens": splits["train"]["label_tokens"],
            "padding_ratio_unpacked": round(unpacked_padding, 5),
            "padding_ratio_packed": round(packed_padding, 5) if pack else None,
            "val_conversations": splits["val"]["documents"] if "val" in splits else 0,
        }
        manifest = {
            "format": SFT_FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "max_token_id": max(split.pop("max_token_id") for split in splits.values()),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "tokenizer": str(tokenizer.name_or_path),
            "max_seq_len": max_seq_len,
            "packed": pack,
            "truncation": truncation,
            "val_fraction": val_fraction,
            "splits": splits,
            "summary": summary,
            "sources": [{"path": s.name, "bytes": s.size_bytes} for s in sources],
            "seconds": round(time.perf_counter() - started, 2),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra_manifest or {}),
        }
        write_json(tmp / "manifest.json", manifest)
        (tmp / "summary.txt").write_text(format_summary(summary, max_seq_len, pack) + "\n", encoding="utf-8")
    return manifest


def _write_split(tmp: Path, prefix: str, kept: list[tuple[list[int], list[int]]], bins: list[list[int]],
                 dtype: np.dtype) -> dict:
    """Write one split's four files (`prefix` "" for train, "val_" for val); returns its manifest entry."""
    total = sum(len(ids) for ids, _ in kept)
    flat_ids = np.empty(total, dtype=dtype)
    flat_mask = np.empty(total, dtype=np.uint8)
    row_offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    seq_offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    pos, s = 0, 0
    for r, members in enumerate(bins):
        for i in members:
            ids, mask = kept[i]
            flat_ids[pos : pos + len(ids)] = ids
            flat_mask[pos : pos + len(ids)] = mask
            pos += len(ids)
            s += 1
            seq_offsets[s] = pos
        row_offsets[r + 1] = pos
    flat_ids.tofile(tmp / f"{prefix}input_ids.bin")
    flat_mask.tofile(tmp / f"{prefix}loss_mask.bin")
    np.save(tmp / f"{prefix}row_offsets.npy", row_offsets)
    np.save(tmp / f"{prefix}seq_offsets.npy", seq_offsets)
    return {"files": [{"name": f"{prefix}input_ids.bin", "tokens": total}], "tokens": total,
            "documents": len(kept), "rows": len(bins), "label_tokens": int(flat_mask.sum()),
            "max_token_id": int(flat_ids.max())}


def format_summary(summary: dict, max_seq_len: int, pack: bool) -> str:
    """Human-readable summary lines (printed by the CLI and saved as summary.txt)."""
    held_out = summary.get("val_conversations")
    lines = [
        f"rows read: {summary['rows_read']:,}; conversations kept: {summary['conversations']:,}"
        + (f" (+ {held_out:,} held out as the val split, also as chats in {VAL_CHATS})" if held_out else "")
        + f"; invalid rows skipped: {summary['invalid_rows']:,}",
        f"longer than max_seq_len {max_seq_len} (counted before the val split): truncated at a turn boundary "
        f"{summary['truncated']:,}, dropped {summary['dropped_too_long']:,}",
        f"tokens: {summary['tokens']:,} (labels on {summary['label_tokens']:,}) in {summary['rows']:,} rows",
    ]
    unpacked = f"unpacked {summary['padding_ratio_unpacked']:.2%}"
    if pack:
        lines.append(
            f"padding ratio: packed {summary['padding_ratio_packed']:.2%} (vs {unpacked} without packing, rows padded "
            "to max_seq_len)"
        )
    else:
        lines.append(f"padding ratio: {unpacked} (rows padded to max_seq_len; batches padded to their longest row pad "
                     "less; --pack removes most of it)")
    if summary["invalid_by_reason"]:
        lines.append(
            "invalid rows by reason: "
            + "; ".join(f"{k}: {v}" for k, v in summary["invalid_by_reason"].items())
        )
        lines += [f"  {r}" for r in summary["first_invalid"]]
    return "\n".join(lines)


class SFTDataset:
    """Rows of one split (`train` or `val`) of an SFT data directory: {"input_ids", "labels"} LongTensors, plus
    "position_ids" when packed."""

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, SFT_FORMAT)
        with malformed_manifest_is_user_error(self.directory):
            self._open_split(split)

    def _open_split(self, split: str) -> None:
        if split not in self.manifest["splits"]:
            hint = " (built without --val-fraction)" if split == "val" else ""
            raise UserError(f"{self.directory}: no '{split}' split{hint}; it has {', '.join(self.manifest['splits'])}")
        self.prefix = "" if split == "train" else f"{split}_"
        dtype = np.dtype(self.manifest["dtype"])
        total = self.manifest["splits"][split]["tokens"]
        check_file_tokens(self.directory / f"{self.prefix}input_ids.bin", total, dtype)
        check_file_tokens(self.directory / f"{self.prefix}loss_mask.bin", total, np.dtype(np.uint8))
        self.dtype = dtype
        self._maps: tuple[np.memmap, np.memmap] | None = None
        try:
            self.row_offsets = np.load(self.directory / f"{self.prefix}row_offsets.npy")
            self.seq_offsets = np.load(self.directory / f"{self.prefix}seq_offsets.npy")
        except (OSError, ValueError) as err:
            raise UserError(f"{self.directory}: cannot read the row offsets ({err})") from None
        if self.row_offsets[-1] != total or self.seq_offsets[-1] != total:
            raise UserError(f"{self.directory}: row offsets do not match the {total} tokens in the manifest")
        self.packed = bool(self.manifest["packed"])
        self.max_seq_len = int(self.manifest["max_seq_len"])

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def _memmaps(self) -> tuple[np.memmap, np.memmap]:
        """(input_ids, loss_mask) memory maps, opened lazily in each process (workers never pickle the data)."""
        if self._maps is None:
            self._maps = (
                np.memmap(self.directory / f"{self.prefix}input_ids.bin", dtype=self.dtype, mode="r"),
                np.memmap(self.directory / f"{self.prefix}loss_mask.bin", dtype=np.uint8, mode="r"),
            )
        return self._maps

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def cu_seqlens(self, index: int) -> np.ndarray:
        """Cumulative conversation lengths inside row `index`: [0, len1, len1+len2, ..., row length]."""
        a, b = int(self.row_offsets[index]), int(self.row_offsets[index + 1])
        lo, hi = np.searchsorted(self.seq_offsets, [a, b])
        return self.seq_offsets[lo : hi + 1] - a

    def __getitem__(self, index: int) -> dict:
        import torch

        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range ({len(self)} rows)")
        index %= len(self)
        a, b = int(self.row_offsets[index]), int(self.row_offsets[index + 1])
        input_ids, loss_mask = self._memmaps()
        ids = torch.from_numpy(input_ids[a:b].astype(np.int64))  # (L,)
        mask = torch.from_numpy(loss_mask[a:b].astype(np.bool_))  # (L,)
        item = {"input_ids": ids, "labels": torch.where(mask, ids, torch.full_like(ids, -100))}
        if self.packed:
            cu = self.cu_seqlens(index)
            lengths = np.diff(cu)
            # position k within its conversation: k minus the conversation's start
            item["position_ids"] = torch.from_numpy(
                np.arange(b - a) - np.repeat(cu[:-1], lengths)
            ).long()  # (L,)
        return item
