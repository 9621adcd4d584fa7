"""Multiple-choice accuracy by log-likelihood (C-Eval, CMMLU, MMLU, ARC), scored the way lm-evaluation-harness does.

    minillm eval mc --model runs/pretrain_mini_llama3_*/final --data ceval_val.csv --dev ceval_dev.csv --few-shot 5
    minillm eval mc --model runs/sft_mini_llama3_*/final --data mmlu_test.parquet --chat --json mmlu.json
    evaluate_multiple_choice(model, tokenizer, questions, few_shot=5, dev=dev_questions)   # from Python

Each choice is scored by the log-probability the model gives its text after the question's prompt; the predicted
answer is the most likely choice. Nothing is generated, so a 64M model that cannot yet follow the format still gets
a meaningful (if near-chance) number, and models with different tokenizers compare.

Notable choices:
- Input layouts (column names are matched case-insensitively): C-Eval/CMMLU/MMLU-style `question`, `A`, `B`,
  `C`, `D` (as many consecutive letter columns as there are) and `answer` (a letter); or the generic `question`,
  `choices` (a list, or ARC's `{"text": [...], "label": [...]}`) and `answer` / `answerKey` (an index, a letter, or
  one of the labels). A `subject` or `category` column gives per-subject accuracy. Files: .jsonl, .json, .csv,
  .parquet; any other source is a Hugging Face dataset name (`datasets.load_dataset(name, config, split=...)`).
- Prompts: `cloze` (default, ARC-style) scores each choice's text after "Question: ...\nAnswer:"; `letters`
  (MMLU/C-Eval style in lm-eval) lists the choices as "A. ..." in the prompt and scores the letters " A", " B", ...
  With `chat`, the question is a user turn rendered by the tokenizer's chat template (for SFT models) and the
  choice is the assistant's reply. `few_shot` solved examples (from a separate dev set, the first K of the same
  subject when both sets name subjects) come before the question, "\n\n"-separated or as earlier chat turns.
  Questions and choices are read as written: one that spells a control token (`<|im_end|>`) is scored as those
  characters, with `chat` too (only the chat template's own control tokens are control tokens).
- Three accuracies, as in lm-eval: `acc` (argmax of the summed log-probability), `acc_norm` (divided by the
  choice's length in characters, lm-eval's `acc_norm`) and `acc_bytes` (divided by its UTF-8 byte length,
  lm-eval's `acc_bytes`, fairer than characters when choices mix Chinese and ASCII). Per-subject and overall
  accuracies are means over questions (overall = micro average), with the chance level (mean of 1 / choices).
- Tokens: like lm-eval, the context's trailing whitespace moves to the continuation, the pair is encoded as one
  string and the continuation is what follows the context's tokens, so the split never depends on how the
  tokenizer treats a lone leading space. Plain prompts start after the tokenizer's bos (else eos), the token that
  precedes every document in our pretraining shards. Too long inputs lose the start of their context.
- Batching: all choices of `batch_size` questions go in one left-padded forward (questions sorted by length, so a
  batch pads little), with `position_ids` counting real tokens only. Left padding puts every continuation at the
  end of its row, so the model only computes logits for the last few positions (`logits_to_keep`), not (B, L, V).
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from minillm.data.sources import under_local_directory
from minillm.errors import UserError
from minillm.evaluation.loading import resolve_max_seq_len
from minillm.evaluation.scoring import progress_bar
from minillm.inference.prompt import control_tokens
from minillm.tokenizer import spelled_special_token

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
STYLES = ("cloze", "letters")
LETTERS = string.ascii_uppercase
SUBJECT_COLUMNS = ("subject", "category")
ANSWER_COLUMNS = ("answer", "answerkey")
FEWSHOT_SEPARATOR = "\n\n"
LAYOUTS = "expected question, A, B, C, D, answer (C-Eval/CMMLU/MMLU) or question, choices, answer"


@dataclass
class Question:
    """One multiple-choice question: `answer` is the index of the correct choice."""

    question: str
    choices: list[str]
    answer: int
    subject: str | None = None


# ---------------------------------------------------------------- reading questions


def load_questions(
    source: str | Path,
    config: str | None = None,
    split: str = "test",
    limit: int | None = None,
    option: str = "--data",
) -> list[Question]:
    """The questions of a local file, or of a Hugging Face dataset (`config`, `split`); at most `limit`."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {source}: a directory; give a .jsonl/.json/.csv/.parquet file")
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise UserError(
                f"{option} {source}: unsupported file type '{path.suffix}' (expected {', '.join(LOCAL_SUFFIXES)})"
            )
        rows, where = _read_rows(path), str(path)
    elif not names_hub_dataset(source):
        raise UserError(f"{option} {source}: no such file")
    else:
        rows, where = (
            _load_hub_rows(source, config, split, option),
            f"{source} ({config or 'default'}/{split})",
        )
    questions = parse_rows(rows, where, limit)
    if not questions:
        raise UserError(f"{option} {source}: no question in the file")
    return questions


def names_hub_dataset(source: str | Path) -> bool:
    """Whether `source` is read as a Hugging Face dataset name: no such local path, and nothing in it (a question
    file's suffix, a leading `.`, `/` or `~`, a first directory that exists here) says it was meant as one."""
    source = str(source)
    path = Path(source).expanduser()
    return not (
        path.exists()
        or path.suffix.lower() in LOCAL_SUFFIXES
        or source.startswith((".", "/", "~"))
        or under_local_directory(source)
    )


def _read_rows(path: Path) -> list[tuple[str, Any]]:
    """(location, row) pairs of a local file; the location ("file:line" / "file row N") names a bad row."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except Exception as err:  # pyarrow raises several types for a corrupt file
                raise UserError(f"{path}: not a readable parquet file ({err})") from err
            return [(f"{path} row {i + 1}", row) for i, row in enumerate(table.to_pylist())]
        text = path.read_text(encoding="utf-8-sig")  # -sig: CSVs saved by spreadsheets start with a BOM
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if suffix == ".csv":
        # newline="": a quoted field keeps its line breaks (a multi-line question), and only \r / \n end rows
        # (str.splitlines also split at U+2028 and other separators inside fields)
        rows = []
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        try:
            for i, row in enumerate(reader, start=1):
                extra = [field for field in row.pop(None, []) if field.strip()]  # fields beyond the header's;
                if extra:  # empty ones (a spreadsheet's trailing comma) shift nothing
                    raise UserError(f"{path} row {i}: {len(extra)} more field(s) than the header has columns "
                                    "(a comma in an unquoted field?)")
                missing = [column for column, value in row.items() if value is None]
                if missing:
                    raise UserError(f"{path} row {i}: {len(row) - len(missing)} field(s) where the header has "
                                    f"{len(row)} columns (missing: {', '.join(missing)})")
                rows.append((f"{path} row {i}", row))
        except csv.Error as err:  # strict: a quote never closed would otherwise swallow the rest of the file
            hint = ": a quoted field is never closed" if "end of data" in str(err) else ""
            raise UserError(f"{path} row {len(rows) + 1}: not valid CSV ({err}{hint})") from err
        return rows
    if suffix == ".json" and text.strip():
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON Lines saved as .json, as `datasets` writes them: read line by line below
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if isinstance(data, list):
            return [(f"{path} item {i + 1}", row) for i, row in enumerate(data)]
        if data is not None:
            raise UserError(f"{path}: expected a JSON list of question objects")
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # JSON strings may hold U+2028; only \n ends a line
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg} column {err.colno})") from err
    return rows


def _load_hub_rows(name: str, config: str | None, split: str, option: str) -> list[tuple[str, Any]]:
    """Rows of a Hugging Face hub dataset through `datasets.load_dataset` (cached under ~/.cache/huggingface)."""
    import datasets

    from minillm.data.sources import check_on_hub, hub_offline

    if not hub_offline():  # offline mode reads the cache at once; online, an unreachable hub fails in one request
        check_on_hub(name, option, local="a local .csv, .jsonl, .json or .parquet file")  # not half a minute of retries
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name/config/split: `datasets` raises many types
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{option} {name}: cannot load it from the Hugging Face hub ({message})") from err
    return [(f"{name} row {i + 1}", row) for i, row in enumerate(dataset)]


def parse_rows(rows: Sequence[tuple[str, Any]], where: str, limit: int | None = None) -> list[Question]:
    """Questions from (location, row) pairs in one of the accepted layouts; anything else is a `UserError`."""
    questions: list[Question] = []
    for location, row in rows:
        if limit is not None and len(questions) >= limit:
            break
        if not isinstance(row, dict):
            raise UserError(f"{location}: expected an object with question fields, got {type(row).__name__}")
        questions.append(_parse_row({str(k).strip().lower(): v for k, v in row.items()}, location, where))
    return questions


def _parse_row(row: dict[str, Any], location: str, where: str) -> Question:
    letter_columns = list(_letter_columns(row, where))
    answer_column = next((c for c in ANSWER_COLUMNS if c in row), None)
    missing = [name for name, ok in (("question", "question" in row), ("answer", answer_column)) if not ok]
    if "choices" not in row and len(letter_columns) < 2:
        missing.append("choices (or A, B, C, D)")
    if missing:
        found = ", ".join(row) or "no column"
        raise UserError(f"{where}: missing column(s) {', '.join(missing)} (found: {found}); {LAYOUTS}")
    if row["question"] is None or str(row["question"]).strip() == "":
        raise UserError(f"{location}: the question is empty")
    answer = row[answer_column]
    if "choices" not in row and isinstance(answer, str) and answer.strip().isdigit():
        # an integer column is an index from 0 (Hugging Face's ClassLabel); digits typed beside A, B, ... columns
        # (a CSV) could count from 0 or from 1
        raise UserError(f"{location}: answer {answer!r} beside choice columns A, B, ...: give the letter")

    labels: list[str] | None = None
    if "choices" in row:
        choices, labels = _parse_choices(row["choices"], location)
    else:
        choices = [row[column] for column in letter_columns]
        # Blank trailing cells are no choices: a CSV or parquet file with 4 letter columns holds 3-choice
        # questions as an empty (or null) D. A blank before a filled one is an error below.
        while choices and (choices[-1] is None or str(choices[-1]).strip() == ""):
            choices.pop()
    if any(choice is None or str(choice).strip() == "" for choice in choices):
        raise UserError(f"{location}: a choice is empty")
    choices = [str(choice) for choice in choices]
    if len(choices) < 2:
        raise UserError(f"{location}: a question needs at least 2 choices, found {len(choices)}")
    subject = next((row[c] for c in SUBJECT_COLUMNS if row.get(c) not in (None, "")), None)
    return Question(
        question=str(row["question"]),
        choices=choices,
        answer=_answer_index(row[answer_column], len(choices), labels, location),
        subject=None if subject is None else str(subject),
    )


def _letter_columns(row: dict[str, Any], where: str) -> list[str]:
    """The consecutive single-letter columns a, b, c, ... of a C-Eval-style row. A gap (a, b, d) is an error: the
    choices after it would otherwise be dropped without a word."""
    letters = LETTERS.lower()
    columns = []
    for letter in letters:
        if letter not in row:
            break
        columns.append(letter)
    later = [letter.upper() for letter in letters[len(columns) + 1 :] if letter in row]
    if columns and later:
        raise UserError(f"{where}: choice columns {', '.join(c.upper() for c in columns)} then {', '.join(later)}, "
                        f"no column {letters[len(columns)].upper()}")
    return columns


def _parse_choices(value: Any, location: str) -> tuple[list[Any], list[str] | None]:
    """A `choices` cell: a list, ARC's {"text": [...], "label": [...]}, or either one JSON-encoded (CSV)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(f"{location}: 'choices' is text, not a list (or a JSON-encoded list)") from err
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        labels = value.get("label")
        if isinstance(labels, list) and len(labels) == len(value["text"]):
            return list(value["text"]), [str(label).strip() for label in labels]
        return list(value["text"]), None
    if isinstance(value, (list, tuple)):
        return list(value), None
    raise UserError(f"{location}: 'choices' must be a list of strings, got {type(value).__name__}")


def _answer_index(value: Any, n_choices: int, labels: list[str] | None, location: str) -> int:
    """The index of the correct choice from an index, a letter or one of the choice labels."""
    letters = f"{LETTERS[0]}-{LETTERS[n_choices - 1]}" if n_choices <= len(LETTERS) else "letters"
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # an integer column read through a float type (e.g. with missing values)
    if isinstance(value, int) and not isinstance(value, bool) and labels is not None and str(value) in labels:
        return labels.index(str(value))  # ARC's numeric labels ("1".."4"): the same whether read as text or number
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < n_choices:
            return value
        raise UserError(
            f"{location}: answer {value} is not among the {n_choices} choices (index 0-{n_choices - 1})"
        )
    text = str(value).strip() if value is not None else ""
    if labels is not None and text in labels:
        return labels.index(text)
    if len(text) == 1 and text.upper() in LETTERS:
        index = LETTERS.index(text.upper())
        if index < n_choices:
            return index
    elif text.isdigit() and int(text) < n_choices:
        return int(text)
    raise UserError(f"{location}: answer {text!r} is not among the {n_choices} choices ({letters})")


def select_shots(question: Question, dev: Sequence[Question], k: int, where: str = "--dev") -> list[Question]:
    """The first `k` dev questions of the same subject when both name one, else the first `k` of the dev set."""
    if k == 0:
        return []
    pool = list(dev)
    if question.subject is not None and any(d.subject is not None for d in dev):
        pool = [d for d in dev if d.subject == question.subject]
        if len(pool) < k:
            raise UserError(
                f"{where}: {len(pool)} question(s) of subject '{question.subject}', fewer than --few-shot {k}"
            )
    elif len(pool) < k:
        raise UserError(f"{where}: {len(pool)} question(s), fewer than --few-shot {k}")
    return pool[:k]


# ---------------------------------------------------------------- prompts and tokens


def _question_text(question: Question, style: str) -> str:
    if style == "letters":
        options = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices))
        return f"{question.question.strip()}{options}"
    return question.question.strip()


def targets(question: Question, style: str) -> list[str]:
    """The strings scored for each choice: its text (cloze) or its letter (letters)."""
    return list(LETTERS[: len(question.choices)]) if style == "letters" else list(question.choices)


# Marks a message's place in the chat template's output while control tokens are located (private-use
# characters, so no question holds them).
_MESSAGE_MARK = "\ue000{}\ue001"


class TemplateText(str):
    """Text written by the chat template: its control tokens (`<|im_start|>`) are read as control tokens. Any other
    text piece of a context is read as plain characters."""


def build_context(
    question: Question,
    shots: Sequence[Question],
    style: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    chat: bool = False,
) -> tuple[list[str | int], str]:
    """(context pieces, delimiter put before each choice) of one question with its solved examples.

    Pieces are text (a `TemplateText` reads its control tokens as such, a `str` is plain characters) and control
    token ids. With `chat`, the context is the rendered chat template as one `TemplateText`, unless a message or a
    choice spells a control token: then `chat_template_pieces` keeps that text plain.
    """
    if chat:
        messages = []
        for shot in shots:
            messages.append({"role": "user", "content": _question_text(shot, style)})
            messages.append({"role": "assistant", "content": targets(shot, style)[shot.answer]})
        messages.append({"role": "user", "content": _question_text(question, style)})
        specials = control_tokens(tokenizer)
        texts = [m["content"] for m in messages] + targets(question, style)
        if any(spelled_special_token(text, specials) for text in texts):
            return chat_template_pieces(tokenizer, messages), ""
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return [TemplateText(rendered)], ""  # the reply starts right after the assistant header
    blocks = [f"Question: {_question_text(s, style)}\nAnswer: {targets(s, style)[s.answer]}" for s in shots]
    blocks.append(f"Question: {_question_text(question, style)}\nAnswer:")
    return [FEWSHOT_SEPARATOR.join(blocks)], " "


def chat_template_pieces(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[str | int]:
    """The chat template's rendering of `messages` (ending with the assistant's opening) as plain text pieces and
    the ids of the control tokens the template itself writes.

    Tokenizing the rendered string would also turn a control token's text inside a message into that token: a
    question that spells `<|im_end|>` would close its own turn. A benchmark question is data, scored as written
    (as the data builder encodes such text), so the messages are rendered as marks first, the template's control
    tokens are located around them, and the marks are then replaced by the messages' text. (Used only for such
    questions: a template that edits a message, such as trimming it, or control tokens that swallow neighbouring
    spaces would make these ids differ slightly from those of the rendered string.)
    """
    marked = [{**m, "content": _MESSAGE_MARK.format(i)} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    specials = sorted(control_tokens(tokenizer), key=len, reverse=True)  # longest first, as the tokenizer matches
    mark = re.compile(_MESSAGE_MARK.format("([0-9]+)"))
    pieces: list[str | int] = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", rendered) if specials else [rendered]:
        if part in specials:
            pieces.append(tokenizer.convert_tokens_to_ids(part))
        elif part:
            pieces.append(mark.sub(lambda m: messages[int(m.group(1))]["content"], part))
    return pieces


def _encode_pieces(tokenizer: PreTrainedTokenizerBase, pieces: Sequence[str | int]) -> list[int]:
    """Token ids of context pieces (see `build_context`), in order."""
    ids: list[int] = []
    for piece in pieces:
        if isinstance(piece, int):
            ids.append(piece)
        else:
            plain = not isinstance(piece, TemplateText)
            ids.extend(tokenizer(piece, add_special_tokens=False, split_special_tokens=plain)["input_ids"])
    return ids


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: Sequence[str | int], continuation: str, prefix: list[int]
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the pair encoded as one string, split after the context's tokens.

    Trailing whitespace of the context moves to the continuation first (lm-eval's rule): "Answer:" + " Paris"
    tokenizes like running text, so the scored tokens are those the model would really have to produce.
    `context`: pieces of `build_context`; the continuation joins its last text piece and is read the same way.
    """
    context = list(context)
    if context and isinstance(context[-1], str):
        last = context[-1]
        stripped = last.rstrip()
        continuation = last[len(stripped) :] + continuation
        context[-1] = type(last)(stripped)
        whole = _encode_pieces(tokenizer, [*context[:-1], type(last)(stripped + continuation)])
    else:
        whole = _encode_pieces(tokenizer, [*context, continuation])
    context_ids = _encode_pieces(tokenizer, context)
    return prefix + list(context_ids), list(whole[len(context_ids) :])


def question_requests(
    tokenizer: PreTrainedTokenizerBase,
    question: Question,
    shots: Sequence[Question],
    style: str,
    chat: bool,
    max_seq_len: int,
) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """One (model inputs, continuation ids) per choice, and whether any input lost the start of its context.

    The inputs are context + continuation without its last token, so their last len(continuation) positions
    predict the continuation.
    """
    context, delimiter = build_context(question, shots, style, tokenizer, chat)
    if chat:
        prefix = []  # the chat template decides how a conversation starts
    else:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        prefix = [start] if start is not None else []
    requests, truncated = [], False
    for index, target in enumerate(targets(question, style)):
        context_ids, continuation_ids = encode_pair(tokenizer, context, delimiter + target, prefix)
        if not continuation_ids:
            raise UserError(f"question {question.question[:40]!r}: choice {index + 1} encodes to no token")
        if len(continuation_ids) > max_seq_len:
            raise UserError(
                f"question {question.question[:40]!r}: choice {index + 1} has {len(continuation_ids)} tokens, "
                f"more than --max-seq-len {max_seq_len}"
            )
        if not context_ids:  # nothing would predict the first token (no bos/eos and an empty prompt)
            raise UserError(f"question {question.question[:40]!r}: nothing to condition the choices on")
        inputs = (context_ids + continuation_ids)[:-1]
        truncated |= len(inputs) > max_seq_len
        requests.append((inputs[-max_seq_len:], continuation_ids))
    return requests, truncated


# ---------------------------------------------------------------- scoring


def score_sequences(
    model: torch.nn.Module,
    groups: Sequence[Sequence[tuple[list[int], list[int]]]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> list[list[float]]:
    """Summed log-probability of each continuation given its context, per group, in batches of `batch_size` groups.

    A sequence is (inputs, continuation): `inputs` ends with the continuation minus its last token, so the last
    `len(continuation)` positions of `inputs` predict the continuation. Groups (all choices of one question) stay
    together in one forward; groups are sorted longest first, so a batch pads little and memory peaks at once.
    """
    import torch

    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    scores: list[list[float]] = [[] for _ in groups]
    order = sorted(range(len(groups)), key=lambda g: max(len(ids) for ids, _ in groups[g]), reverse=True)
    with progress_bar(progress) as bar:
        task = bar.add_task("multiple choice", total=len(order), rate="")
        done_rows = 0
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = [seq for g in chunk for seq in groups[g]]
            with torch.inference_mode():
                row_scores = _batch_loglikelihood(model, rows, pad_id, device, keep_arg)
            for g in chunk:
                scores[g], row_scores = row_scores[: len(groups[g])], row_scores[len(groups[g]) :]
            done_rows += len(rows)
            bar.update(task, advance=len(chunk), rate=f"{done_rows:,} choices")
    return scores


def _batch_loglikelihood(
    model: torch.nn.Module,
    rows: list[tuple[list[int], list[int]]],
    pad_id: int,
    device: torch.device,
    keep_arg: bool,
) -> list[float]:
    import torch

    width = max(len(ids) for ids, _ in rows)
    keep = max(len(cont) for _, cont in rows)  # K: positions whose logits are needed (all at the right end)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (R, L) left padded
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L)
    target_ids = torch.zeros((len(rows), keep), dtype=torch.long)  # (R, K) right-aligned continuations
    target_mask = torch.zeros((len(rows), keep), dtype=torch.bool)  # (R, K)
    for r, (ids, cont) in enumerate(rows):
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        attention_mask[r, width - len(ids) :] = 1
        target_ids[r, keep - len(cont) :] = torch.tensor(cont)
        target_mask[r, keep - len(cont) :] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # (R, L): real tokens count from 0
    kwargs = {"logits_to_keep": keep} if keep_arg else {}
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=False,
        **kwargs,
    ).logits[:, -keep:, :]  # (R, K, V)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (R, K, V) fp32: K is a few tokens, not L
    picked = logprobs.gather(-1, target_ids.to(device).unsqueeze(-1)).squeeze(-1)  # (R, K)
    return (picked * target_mask.to(device)).sum(-1).tolist()  # (R,)


# ---------------------------------------------------------------- the evaluation


def evaluate_multiple_choice(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    dev: Sequence[Question] | None = None,
    few_shot: int = 0,
    style: str = "cloze",
    chat: bool = False,
    max_seq_len: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of `model` on `questions`: overall, per subject, and every question's choice log-likelihoods.

    Returns `questions`, `chance`, `acc`, `acc_stderr`, `acc_norm`, `acc_bytes`, `truncated`, `style`, `chat`,
    `few_shot`, `subjects` (a list of the same numbers per subject; empty without subjects) and `items` (per
    question: `subject`, `answer`, `pred`, `pred_norm`, `pred_bytes`, `loglikelihoods`).
    """
    import torch

    if style not in STYLES:
        raise UserError(f"--style {style}: expected one of {', '.join(STYLES)}")
    if few_shot < 0:
        raise UserError(f"--few-shot {few_shot}: must be 0 or more")
    if few_shot and not dev:
        raise UserError(
            f"--few-shot {few_shot} needs solved examples: pass --dev FILE (e.g. C-Eval's dev split)"
        )
    if chat and not tokenizer.chat_template:
        raise UserError("--chat: the model's tokenizer has no chat template; drop --chat for a base model")
    if not questions:
        raise UserError("no question to evaluate")
    max_seq_len = resolve_max_seq_len(model, max_seq_len)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0  # padded positions are masked out, any id does

    groups, truncated = [], 0
    for question in questions:
        shots = select_shots(question, dev or [], few_shot)
        requests, was_truncated = question_requests(tokenizer, question, shots, style, chat, max_seq_len)
        groups.append(requests)
        truncated += was_truncated

    was_training = model.training
    model.eval()
    try:
        scores = score_sequences(model, groups, pad_id, batch_size, device, progress)
    finally:
        model.train(was_training)

    items = []
    for question, lls in zip(questions, scores, strict=True):
        scored = targets(question, style)
        chars = [max(len(t), 1) for t in scored]
        n_bytes = [max(len(t.encode("utf-8")), 1) for t in scored]
        items.append(
            {
                "subject": question.subject,
                "answer": question.answer,
                "pred": _argmax(lls),
                "pred_norm": _argmax([ll / n for ll, n in zip(lls, chars, strict=True)]),
                "pred_bytes": _argmax([ll / n for ll, n in zip(lls, n_bytes, strict=True)]),
                "choices": len(question.choices),
                "loglikelihoods": lls,
            }
        )
    subjects = sorted({item["subject"] for item in items if item["subject"] is not None})
    return {
        **_accuracies(items),
        "truncated": truncated,
        "style": style,
        "chat": chat,
        "few_shot": few_shot,
        "subjects": [
            {"subject": s, **_accuracies([item for item in items if item["subject"] == s])} for s in subjects
        ],
        "items": items,
    }


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy's argmax, which lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _accuracies(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Question count, chance level, acc (with its standard error, as lm-eval reports it), acc_norm, acc_bytes."""
    n = len(items)
    acc = sum(item["pred"] == item["answer"] for item in items) / n
    return {
        "questions": n,
        "chance": sum(1 / item["choices"] for item in items) / n,
        "acc": acc,
        "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else None,
        "acc_norm": sum(item["pred_norm"] == item["answer"] for item in items) / n,
        "acc_bytes": sum(item["pred_bytes"] == item["answer"] for item in items) / n,
    }


def results_table(report: dict[str, Any]) -> Table:
    """One row per subject (when the data names subjects) and an overall row."""
    details = [report["style"], f"{report['few_shot']}-shot"] + (["chat"] if report["chat"] else [])
    table = Table(
        title=f"multiple choice: {report.get('model', 'model')}",
        caption=f"{', '.join(details)}; chance = mean of 1 / number of choices",
        title_justify="left",
        caption_justify="left",
    )
    for name in ("subject", "questions", "chance", "acc", "acc_norm", "acc_bytes"):
        table.add_column(name, justify="left" if name == "subject" else "right")
    rows = [*report["subjects"], {"subject": "[bold]all", **report}]
    for row in rows:
        stderr = f" ± {row['acc_stderr']:.1%}" if row["acc_stderr"] is not None else ""
        table.add_row(
            row["subject"],
            f"{row['questions']:,}",
            f"{row['chance']:.1%}",
            f"{row['acc']:.1%}{stderr}",
            f"{row['acc_norm']:.1%}",
            f"{row['acc_bytes']:.1%}",
        )
    return table
