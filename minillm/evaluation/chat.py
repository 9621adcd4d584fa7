"""Chat evaluation: teacher-forced loss on the assistant tokens of held-out conversations, and greedy exact match.

    minillm eval chat --model runs/sft_mini_llama3_*/final --data heldout_chat.jsonl --json chat.json

Input: what `minillm data sft` takes (`read_conversations`): `.jsonl`, `.json` or `.parquet` rows in the `messages`
(role/content), ShareGPT or Alpaca format, normalised as training normalises them; rows it would skip are skipped
and counted.

Notable choices:
- Loss is scored exactly where SFT trains: the tokens the tokenizer's chat template marks with `{% generation %}`
  (assistant content and its closing `<|im_end|>`), read through `return_assistant_tokens_mask`. A template
  without those markers is refused rather than silently scoring nothing or everything.
- Exact match covers the "short-answer" conversations: those ending with an assistant turn of at most
  `max_new_tokens` tokens, its reasoning included when it has one (e.g. "who wrote this poem?" -> "Li Bai"). The
  model answers the conversation without its last turn greedily; its answer (after the reasoning, as `minillm chat`
  and `serve` read it) matches when it equals the reference after normalising whitespace, case and trailing
  punctuation. Longer answers only count towards the loss: exact match on a paragraph says nothing.
- Generation runs in left-padded batches and stops at `<|im_end|>` or eos. A short-answer conversation whose
  prompt plus `max_new_tokens` does not fit in `max_seq_len` is left out of exact match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm.errors import UserError
from minillm.evaluation.loading import resolve_max_seq_len
from minillm.evaluation.scoring import IGNORE_INDEX, progress_bar, sum_nll
from minillm.inference.prompt import control_tokens, history_answer
from minillm.tokenizer import stop_token_ids

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TRAILING_PUNCTUATION = " \t\n.。!！?？,，;；:：、"

Conversation = list[dict[str, str]]


def read_conversations(path: Path) -> tuple[list[Conversation], dict[str, Any]]:
    """The conversations of a held-out chat file, read as `minillm data sft` reads its inputs (`.jsonl`, `.json` or
    `.parquet`; `messages`, ShareGPT or Alpaca rows, `minillm.data.sft.parse_conversation`), so evaluation sees the
    conversations training would. Rows `data sft` would skip (malformed, no assistant turn, a turn that spells a
    special token) are skipped here too and counted: (conversations, {"invalid_rows": n, "first_invalid": [...]})."""
    from minillm.data.sft import MAX_REASONS, InvalidRow, parse_conversation
    from minillm.data.sources import iter_rows, local_source

    if path.is_dir():
        from minillm.data.sft import VAL_CHATS

        hint = (f" (this one's held-out conversations: --data {path / VAL_CHATS})"
                if (path / VAL_CHATS).is_file() else "")
        raise UserError(f"--data {path}: a directory; give a .jsonl, .json or .parquet file of conversations{hint}")
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    source = local_source(path, kinds=("jsonl", "parquet"), what="--data ")
    conversations: list[Conversation] = []
    invalid: list[str] = []
    for where, row, error in iter_rows(source):
        if error is None:
            try:
                conversations.append(parse_conversation(row))
                continue
            except InvalidRow as err:
                error = str(err)
        invalid.append(f"{where}: {error}")
    if not conversations:
        first = f" (first: {invalid[0]})" if invalid else ""
        raise UserError(f"--data {path}: no conversation with an assistant turn in the file{first}")
    return conversations, {"invalid_rows": len(invalid), "first_invalid": invalid[:MAX_REASONS]}


def normalize_answer(text: str) -> str:
    """Whitespace collapsed, case folded, trailing punctuation dropped: "Li Bai." == "li  bai"."""
    return " ".join(text.split()).casefold().rstrip(TRAILING_PUNCTUATION)


def render(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> dict[str, list[int]]:
    """One conversation through the chat template: `input_ids` and `assistant_masks` (what the model is scored on
    and, for the last turn, how long the reference answer is)."""
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)


def assistant_sequence(
    messages: Conversation, encoded: dict[str, list[int]], max_seq_len: int
) -> tuple[tuple[list[int], list[int]] | None, bool]:
    """(inputs, shifted targets on assistant tokens) of one conversation rendered by `render`, and whether it was
    truncated.

    None when the conversation has no assistant token left after truncation.
    """
    from minillm.data.sft import unlabel_answers_shown_without_reasoning

    ids = list(encoded["input_ids"])  # the turns training labels, no more (earlier answers shown without reasoning)
    mask = unlabel_answers_shown_without_reasoning(messages, list(encoded["assistant_masks"]))
    has_answer = any(m["role"] == "assistant" and m["content"] for m in messages)
    if has_answer and not any(mask):
        raise UserError(
            "the tokenizer's chat template does not mark assistant tokens ({% generation %} ... "
            "{% endgeneration %}); cannot score assistant turns"
        )
    truncated = len(ids) > max_seq_len
    ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    targets = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    if all(t == IGNORE_INDEX for t in targets):
        return None, truncated
    return (ids[:-1], targets), truncated


def answer_tokens(full_ids: list[int], prompt_len: int, stops: list[int]) -> int:
    """How many tokens the model writes for the last assistant turn before its stop token: the turn as the chat
    template renders it (`full_ids`, the whole conversation) after the prompt (`prompt_len` tokens), so a reasoning
    block counts as well as the answer."""
    turn = list(full_ids)[prompt_len:]
    return next((k for k, token in enumerate(turn) if token in stops), len(turn))


def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of tokenized prompts (left-padded batches), cut at the first stop token, decoded, and
    read as answers: without a leading reasoning block, and without control tokens' text (`history_answer`). Decoding
    without special tokens kept a reasoning model's thoughts but lost the `<think>` tags that set them apart, so its
    answers never matched."""
    import torch

    from minillm.inference.sampling import ids_past_tokenizer

    stops = stop_token_ids(tokenizer)
    specials = control_tokens(tokenizer)
    suppressed = ids_past_tokenizer(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    answers: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    with progress_bar(progress) as bar:
        task = bar.add_task("greedy answers", total=len(order), rate="")
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, P) left padded
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, P)
            for row, i in enumerate(chunk):
                input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attention_mask[row, width - len(prompts[i]) :] = 1
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=stops,
                    pad_token_id=pad_id,
                    suppress_tokens=suppressed or None,  # ids decoding would drop (a head padded past the vocabulary)
                )  # (B, P + new)
            for row, i in enumerate(chunk):
                new = output[row, width:].tolist()
                cut = next((k for k, tok in enumerate(new) if tok in stops), len(new))
                answers[i] = history_answer(tokenizer.decode(new[:cut], skip_special_tokens=False), specials)
            bar.update(task, advance=len(chunk), rate="")
    return answers


def evaluate_chat(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Conversation],
    max_seq_len: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Assistant-token loss over all `conversations`, and exact match over the short-answer ones.

    Conversations are truncated to `max_seq_len` (default: the model's maximum, capped at 2048). Returns
    `conversations`, `truncated`, `assistant_tokens`, `nll`, `loss`, `ppl`, and `exact_match` with
    `items`, `correct`, `rate` (None when no conversation qualifies) and `answers` (prompt, reference, prediction,
    match for each item).
    """
    import torch

    max_seq_len = resolve_max_seq_len(model, max_seq_len)
    stops = stop_token_ids(tokenizer)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    sequences, truncated = [], 0
    rendered = [render(tokenizer, messages) for messages in conversations]  # once: the loss and the answers' length
    for messages, encoded in zip(conversations, rendered, strict=True):
        sequence, was_truncated = assistant_sequence(messages, encoded, max_seq_len)
        truncated += was_truncated
        if sequence is not None:
            sequences.append(sequence)
    if not sequences:
        if truncated:  # the answers were there: the window cut them off
            raise UserError(f"no assistant turn left to score: {truncated} conversation(s) cut at --max-seq-len "
                            f"{max_seq_len} tokens before their answers; raise --max-seq-len")
        raise UserError("no assistant turn to score in the conversations")

    was_training = model.training
    model.eval()
    try:
        total = sum_nll(
            model, sequences, pad_id, batch_size, device, description="assistant loss", progress=progress
        )

        items = []
        for messages, encoded in zip(conversations, rendered, strict=True):
            if len(messages) < 2 or messages[-1]["role"] != "assistant":
                continue
            reference = messages[-1]["content"]
            prompt = tokenizer.apply_chat_template(
                messages[:-1], tokenize=True, return_dict=True, add_generation_prompt=True
            )["input_ids"]
            if answer_tokens(encoded["input_ids"], len(prompt), stops) > max_new_tokens:
                continue
            if len(prompt) + max_new_tokens > max_seq_len:
                continue  # the answer would not fit in the window the model is evaluated at
            items.append({"prompt": messages[-2]["content"], "reference": reference, "ids": list(prompt)})
        predictions = greedy_answers(
            model, tokenizer, [item["ids"] for item in items], max_new_tokens, batch_size, device, progress
        )
    finally:
        model.train(was_training)

    answers = []
    for item, prediction in zip(items, predictions, strict=True):
        match = normalize_answer(prediction) == normalize_answer(item["reference"])
        answers.append(
            {
                "prompt": item["prompt"],
                "reference": item["reference"],
                "prediction": prediction,
                "match": match,
            }
        )
    correct = sum(a["match"] for a in answers)
    loss = total.nll / total.tokens
    return {
        "conversations": len(conversations),
        "truncated": truncated,
        "assistant_tokens": total.tokens,
        "nll": total.nll,
        "loss": loss,
        "ppl": math.exp(loss),
        "exact_match": {
            "items": len(answers),
            "correct": correct,
            "rate": correct / len(answers) if answers else None,
            "answers": answers,
        },
    }
