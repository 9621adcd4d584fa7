"""`minillm chat`: a terminal chat with a trained model.

    minillm chat                                   # the newest run (SFT before pretrain)
    minillm chat --model runs/sft_mini_llama3_20250101-120000/final --temperature 0.7
    minillm chat --prompt "What is a transformer?"  # one answer on stdout, then exit (scriptable)

Commands inside the chat: `/reset` (forget the conversation), `/system TEXT` (set the system prompt, keeping the
conversation), `/exit` (or Ctrl-D).

Notable choices:
- The conversation is re-rendered with the tokenizer's chat template every turn. When it no longer fits the
  context window (with room left for the answer), the oldest turns are dropped first; the chat says so once.
- Reasoning (`<think> ... </think>`) is printed dim and italic so it is easy to tell from the answer, and it is not
  fed back in later turns (the answer alone is kept in the history, as Qwen3 does).
- Turn i samples with seed `seed + i`: a chat session is reproducible, yet two turns do not share their randomness.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.console import Console

from minillm.inference.engine import BaseEngine
from minillm.inference.prompt import (
    THINK_CLOSE,
    THINK_OPEN,
    InvalidText,
    chat_prompt_ids,
    control_tokens,
    history_answer,
)
from minillm.inference.sampling import MAX_SEED, SamplingParams

THINK_STYLE = "dim italic"
HELP = "commands: /reset  /system TEXT  /exit"
TERMINAL_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 (but tab, newline), DEL and C1 controls


@dataclass
class ChatSession:
    """The conversation state and how to turn it into a prompt that fits the context window."""

    engine: BaseEngine
    params: SamplingParams
    system: str | None = None
    history: list[dict] = field(default_factory=list)  # alternating user / assistant messages
    turns: int = 0
    trimmed_notice_given: bool = False

    def reset(self) -> None:
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        """Set (or with None / "" remove) the system prompt; raises ValueError, keeping the old one, for text that
        cannot go into a prompt or leaves no room for a message, so it is refused once when given rather than on
        every later turn (where the error would blame the message)."""
        if text:
            ids = self._render([{"role": "system", "content": text}])
            ctx = self.engine.context_length
            if ctx is not None and len(ids) >= ctx:
                raise ValueError(f"system message: too long: {len(ids)} tokens, the context window is {ctx} tokens")
        self.system = text or None

    def _render(self, messages: list[dict]) -> list[int]:
        try:
            return chat_prompt_ids(self.engine.tokenizer, messages)
        except InvalidText as err:  # the system prompt or the new message: earlier user turns passed before
            raise ValueError(f"{messages[err.index]['role']} message: {err.problem}") from None

    def build_prompt(self, user_text: str) -> tuple[list[int], int]:
        """Token ids for the next answer and how many old turns had to be dropped to fit the window.

        Keeps `min(max_new_tokens, context / 2)` tokens free for the answer. Raises ValueError when even the
        new message alone does not fit, or when a message cannot go into a prompt (`minillm.inference.prompt`);
        the history is then left as it was.
        """
        system = [{"role": "system", "content": self.system}] if self.system else []
        new = [{"role": "user", "content": user_text}]
        ctx = self.engine.context_length
        reserve = min(self.params.max_new_tokens, ctx // 2) if ctx else 0
        start = 0  # history[start:] is what still fits; turns are dropped only once the prompt is known to fit
        while True:
            ids = self._render(system + self.history[start:] + new)
            if ctx is None or len(ids) + reserve <= ctx or start >= len(self.history):
                break
            start += 2  # the oldest user message and its answer
        if ctx is not None and len(ids) >= ctx:
            with_system = f" with the system prompt's {len(self._render(system))}" if system else ""
            raise ValueError(
                f"the message is too long: {len(ids)} tokens{with_system}, the context window is {ctx} tokens"
            )
        del self.history[:start]
        return ids, start // 2

    def reply(self, user_text: str, prompt: list[int]) -> Iterator[str]:
        """Stream the answer's text; the exchange is added to the history once the answer is complete."""
        params = SamplingParams(**{**self.params.__dict__, "seed": _turn_seed(self.params.seed, self.turns)})
        pieces = []
        for events in self.engine.stream([prompt], params):
            for ev in events:
                if ev.text:
                    pieces.append(ev.text)
                    yield ev.text
        self.turns += 1
        # the answer, not the reasoning, for later turns; without any control token's text the model wrote
        answer = history_answer("".join(pieces), control_tokens(self.engine.tokenizer))
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]


def _turn_seed(seed: int | None, turn: int) -> int | None:
    """Turn i samples with `seed + i`, wrapped so a very long session stays within the valid seed range."""
    return None if seed is None else (seed + turn) % (MAX_SEED + 1)


class ThinkPrinter:
    """Prints streamed text, showing what lies between <think> and </think> in a distinct style."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.thinking = False

    def write(self, text: str) -> None:
        while text:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            before, found, text = text.partition(tag)
            if before:
                self._print(before, THINK_STYLE if self.thinking else None)
            if found:
                self._print(found, THINK_STYLE)
                self.thinking = not self.thinking

    def end(self) -> None:
        self.console.print()
        self.thinking = False

    def _print(self, text: str, style: str | None) -> None:
        if self.console.is_terminal:  # a generated escape sequence must not drive the terminal
            text = TERMINAL_CONTROL.sub("", text)
        if style is None:
            # the answer goes out as the model wrote it: rich would expand its tabs and turn ":smile:" into an emoji
            # (code and `--prompt` output in scripts would change)
            self.console.file.write(text)
            self.console.file.flush()
        else:
            self.console.print(text, style=style, end="", markup=False, highlight=False, emoji=False, soft_wrap=True)


def answer_once(session: ChatSession, prompt_text: str, console: Console) -> None:
    """`--prompt`: print one answer and return."""
    prompt, _ = session.build_prompt(prompt_text)
    printer = ThinkPrinter(console)
    for text in session.reply(prompt_text, prompt):
        printer.write(text)
    printer.end()


def run_repl(session: ChatSession, console: Console, model_name: str, read=input) -> None:
    """The interactive loop; reads lines with `read` until /exit or end of input."""
    console.print(f"chatting with [bold]{model_name}[/] — {HELP}", highlight=False)
    printer = ThinkPrinter(console)
    while True:
        try:
            line = read("you> " if sys.stdin.isatty() else "")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print()
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                session.reset()
                console.print("[dim](conversation cleared)[/]")
            elif command == "/system":
                try:
                    session.set_system(arg.strip())
                except ValueError as err:
                    console.print(f"{err}; the system prompt is unchanged", style="red", markup=False,
                                  highlight=False)
                    continue
                console.print(
                    "[dim](system prompt set)[/]" if session.system else "[dim](system prompt removed)[/]"
                )
            else:
                console.print(f"unknown command {command}; {HELP}", markup=False, highlight=False)
            continue
        try:
            prompt, dropped = session.build_prompt(text)
        except ValueError as err:
            console.print(str(err), style="red", markup=False, highlight=False)
            continue
        if dropped and not session.trimmed_notice_given:
            console.print("[dim](older turns are being dropped to fit the context window)[/]")
            session.trimmed_notice_given = True
        console.print("[bold]assistant>[/] ", end="")
        try:
            for piece in session.reply(text, prompt):
                printer.write(piece)
        except KeyboardInterrupt:  # stop this answer, keep the chat
            console.print("[dim] (interrupted)[/]", end="")
        printer.end()
