"""Prompt token ids from chat messages or raw text, refusing text that would not be read as itself.

`minillm chat` and `minillm serve` both build prompts here, so a message that one refuses the other refuses too.

Notable choices:
- A chat prompt is rendered with the tokenizer's chat template and then tokenized with control tokens recognised:
  that is how the template's own `<|im_start|>` / `<|im_end|>` become single ids. A message whose text spells a
  control token would therefore turn into that token: text pasted into a user turn could close it and write a
  forged system or assistant turn. Such a message is refused, as `minillm data sft` skips training
  rows that spell one (`minillm.data.sft.parse_conversation`). An assistant message is most often the model's own
  earlier answer, sent back as the server returned it (`history_answer`): its reasoning (a leading `<think>`
  block, closed or cut off) is dropped, as earlier reasoning is not fed back (Qwen3; `minillm chat`), and so is
  any control token's text in it. A model can write one mid-answer (a stray `</think>`, an `<|im_start|>`): refused,
  the server's own answer could not be sent back and the conversation could not go on. Dropped, the text cannot
  forge a turn either. A raw completion prompt (`/v1/completions`) is the caller's own text and may hold control
  tokens on purpose.
- Text with a lone UTF-16 surrogate (JSON's `"\\ud800"`, or bytes that are not UTF-8 read from a terminal) has no
  UTF-8 encoding, so no tokenizer can read it; it is refused with the position instead of failing inside the
  tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minillm.tokenizer import spelled_special_token

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def answer_without_reasoning(content: str) -> str:
    """An assistant message's answer: for one that opens with `<think>` (as the model's own answers do), the text
    after the reasoning's `</think>`, or "" when it is all reasoning (cut off while thinking); any other text as is
    (an answer that merely mentions the tags keeps every word)."""
    if not content.lstrip().startswith(THINK_OPEN):
        return content
    return content.split(THINK_CLOSE, 1)[1].lstrip() if THINK_CLOSE in content else ""


def history_answer(content: str, specials: list[str]) -> str:
    """An earlier assistant message as it goes back into a prompt: the answer without its reasoning
    (`answer_without_reasoning`) and without the text of any of the control tokens `specials`."""
    answer = answer_without_reasoning(content)
    while (spelled := spelled_special_token(answer, specials)) is not None:
        answer = answer.replace(spelled, "")  # again: removing one may join the halves of another
    return answer


class InvalidText(ValueError):
    """Text that cannot go into a prompt as written; `index` is the message's position (None for a raw prompt)."""

    def __init__(self, problem: str, index: int | None = None) -> None:
        super().__init__(problem)
        self.problem, self.index = problem, index


def check_unicode(text: str, index: int | None = None) -> None:
    """Raise `InvalidText` if `text` holds a lone surrogate (no UTF-8 encoding exists for it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        raise InvalidText(
            f"not valid Unicode text: a lone surrogate U+{code:04X} at character {err.start}", index
        ) from None


def control_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's special added tokens (`<|endoftext|>`, `<|im_start|>`, ...): the texts it turns into ids."""
    return [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of `messages` ({"role", "content"}) through the chat template, ending with the assistant turn's
    opening; assistant messages as `history_answer` keeps them. Raises `InvalidText` (with the message's index) for
    a message the template would misread."""
    specials = control_tokens(tokenizer)
    rendered = []
    for i, message in enumerate(messages):
        content = message["content"]
        if message["role"] == "assistant":
            content = history_answer(content, specials)
        spelled = spelled_special_token(content, specials)
        if spelled is not None:
            raise InvalidText(
                f"the text spells the control token {spelled}, which the chat template would read as that token "
                "(a forged turn); remove it",
                i,
            )
        check_unicode(content, i)
        rendered.append({**message, "content": content})
    text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def text_prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a raw prompt as written, control tokens included (a completion prompt is the caller's text)."""
    check_unicode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
