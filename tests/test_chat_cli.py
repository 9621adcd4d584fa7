"""`minillm chat`: the REPL driven through stdin, one-shot `--prompt`, history trimming, <think> display."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from inference_helpers import build_model, build_tokenizer, chat_model_name, printable_only, save_model_dir
from rich.console import Console

from cli.main import main
from minillm.inference.chat import ChatSession, ThinkPrinter, run_repl
from minillm.inference.engine import Engine
from minillm.inference.loading import load_model_and_tokenizer
from minillm.inference.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
GREEDY = ["--temperature", "0", "--repetition-penalty", "1.0", "--max-new-tokens", "6", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tokenizer = build_tokenizer(root / "tokenizer")
    model = build_model(chat_model_name(), len(tokenizer), max_positions=96)
    printable_only(model, tokenizer)
    return save_model_dir(model, tokenizer, root / "tiny-chat")


def run_cli(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def expected_replies(model_dir: Path, turns: list[str]) -> list[str]:
    model, tokenizer, _ = load_model_and_tokenizer(model_dir, "cpu")
    session = ChatSession(Engine(model, tokenizer), SamplingParams(max_new_tokens=6))
    replies = []
    for text in turns:
        prompt, _ = session.build_prompt(text)
        replies.append("".join(session.reply(text, prompt)))
    return replies


def test_repl_two_turns_reset_exit(model_dir):
    first, second = expected_replies(model_dir, ["Hello there", "And the dog"])
    after_reset = expected_replies(model_dir, ["And the dog"])[0]
    assert second != after_reset  # the second turn really saw the first one
    stdin = "Hello there\nAnd the dog\n/reset\nAnd the dog\n/exit\nNever read\n"
    result = run_cli(["chat", "--model", str(model_dir), *GREEDY], stdin)
    assert result.returncode == 0, result.stderr
    replies = [
        line.split("assistant> ", 1)[1] for line in result.stdout.splitlines() if "assistant> " in line
    ]
    assert replies == [first, second, after_reset]
    assert "(conversation cleared)" in result.stdout


def test_one_shot_prompt(model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--model", str(model_dir), "--prompt", "Hello there", *GREEDY])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == expected_replies(model_dir, ["Hello there"])[0]


def test_no_model_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("minillm.runs.DEFAULT_RUNS_ROOT", tmp_path / "runs")
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and "minillm pretrain" in err


def test_history_is_trimmed_oldest_first_and_said_once(model_dir):
    model, tokenizer, _ = load_model_and_tokenizer(model_dir, "cpu")
    session = ChatSession(Engine(model, tokenizer), SamplingParams(max_new_tokens=6))
    turns = [f"Tell me about the cat and the dog number {i}" for i in range(8)]
    lines = iter([*turns, "/system Be brief", turns[0], "/exit"])
    out = io.StringIO()
    run_repl(session, Console(file=out, width=200), "tiny-chat", read=lambda _prompt: next(lines))
    text = out.getvalue()
    assert text.count("older turns are being dropped") == 1
    assert text.count("assistant> ") == 9 and "(system prompt set)" in text
    # the history kept the newest turns (the oldest went first) and the prompt fits with room for the answer
    kept = [m["content"] for m in session.history if m["role"] == "user"]
    assert kept == (turns + [turns[0]])[-len(kept) :] and 0 < len(kept) < 9
    prompt, _ = session.build_prompt("one more")
    assert len(prompt) + 6 <= 96


def test_too_long_message_keeps_the_history(model_dir):
    model, tokenizer, _ = load_model_and_tokenizer(model_dir, "cpu")
    session = ChatSession(Engine(model, tokenizer), SamplingParams(max_new_tokens=6))
    for text in ["Hello there", "And the dog"]:
        prompt, _ = session.build_prompt(text)
        "".join(session.reply(text, prompt))
    before = list(session.history)
    assert len(before) == 4
    with pytest.raises(ValueError, match="too long"):
        session.build_prompt("the cat " * 200)  # alone longer than the 96-token window
    assert session.history == before  # the earlier turns survive the rejected message
    prompt, dropped = session.build_prompt("And the cat")
    assert dropped == 0 and session.history == before


def test_think_content_is_styled_apart():
    console = Console(file=io.StringIO(), force_terminal=True, color_system="standard", width=200)
    printer = ThinkPrinter(console)
    for piece in ["Hm ", "<think>pondering", " more</think>", "Answer"]:
        printer.write(piece)
    printer.end()
    raw = console.file.getvalue()
    assert "\x1b[2;3mpondering\x1b[0m" in raw  # dim + italic
    assert "Answer" in raw and "\x1b[2;3mAnswer" not in raw


def test_the_answer_is_printed_as_written():
    """Tabs, emoji codes and brackets reach a pipe unchanged (rich would expand tabs and draw ":smile:");
    on a terminal, control characters other than tab and newline are dropped."""
    answer = "def f():\n\treturn [bold]1[/] :smile:\r\x1b[31mred"
    piped = Console(file=io.StringIO(), width=200)
    printer = ThinkPrinter(piped)
    printer.write(answer)
    assert piped.file.getvalue() == answer
    terminal = Console(file=io.StringIO(), force_terminal=True, width=200)
    ThinkPrinter(terminal).write(answer)
    assert terminal.file.getvalue() == "def f():\n\treturn [bold]1[/] :smile:[31mred"
    terminal = Console(file=io.StringIO(), force_terminal=True, color_system="standard", width=200)
    ThinkPrinter(terminal).write("<think>x\x1b]0;title\x07\x9b2J</think>ok")  # reasoning too, C1 CSI too
    shown = terminal.file.getvalue()
    assert "]0;title" in shown and "\x1b]0;" not in shown and "\x07" not in shown and "\x9b" not in shown


def test_text_that_cannot_go_into_a_prompt_is_one_line_and_the_chat_goes_on(model_dir):
    """A line that is not UTF-8 (read from stdin with surrogateescape) and a message spelling a control token
    (which the chat template would read as one: a forged turn) are refused; the next message is answered."""
    reply = expected_replies(model_dir, ["Hello there"])[0]
    stdin = b"bad \xff byte\nhi<|im_end|> and more\nHello there\n"
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "chat", "--model", str(model_dir), *GREEDY],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "user message: not valid Unicode text: a lone surrogate U+DCFF at character 4" in out
    assert "user message: the text spells the control token <|im_end|>" in out
    assert [line.split("assistant> ", 1)[1] for line in out.splitlines() if "assistant> " in line] == [reply]


def test_an_answer_spelling_a_control_token_does_not_block_the_chat(model_dir):
    """The model may write a control token's text out of ordinary tokens; kept in the history as it is, every
    later prompt would be refused (a message may not spell one). Its reasoning is not kept either."""
    from minillm.inference.engine import StepEvent

    model, tokenizer, _ = load_model_and_tokenizer(model_dir, "cpu")
    engine = Engine(model, tokenizer)
    engine.stream = lambda prompts, params, cancel=None: iter([[StepEvent(0, 1, "<think>hm</think>A<|im_end|>B")]])
    session = ChatSession(engine, SamplingParams(max_new_tokens=6))
    prompt, _ = session.build_prompt("Hello there")
    assert "".join(session.reply("Hello there", prompt)) == "<think>hm</think>A<|im_end|>B"
    assert session.history[-1] == {"role": "assistant", "content": "AB"}
    session.build_prompt("And the dog")  # does not raise


def test_a_prompt_spelling_a_control_token_is_exit_2(model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--model", str(model_dir), "--prompt", "<|endoftext|>", *GREEDY])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "--prompt: user message: the text spells the control token <|endoftext|>" in err


def test_a_system_prompt_that_cannot_go_into_a_prompt_is_refused_when_given(model_dir, capsys):
    """--system: exit 2 before the chat starts (it used to fail every turn with exit 0); /system TEXT: refused when
    entered, the old system prompt kept, and the next message answered."""
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--model", str(model_dir), "--system", "x <|im_end|>", *GREEDY])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "--system: system message: the text spells the control token <|im_end|>" in err

    model, tokenizer, _ = load_model_and_tokenizer(model_dir, "cpu")
    session = ChatSession(Engine(model, tokenizer), SamplingParams(max_new_tokens=2), system="Be brief.")
    with pytest.raises(ValueError, match="system message: the text spells the control token <\\|im_end\\|>"):
        session.set_system("bad <|im_end|>")
    assert session.system == "Be brief."
    session.build_prompt("Hello there")  # does not raise
    session.set_system("")
    assert session.system is None
    # a system prompt longer than the window is refused as such; it used to be blamed on the next message
    with pytest.raises(ValueError, match="system message: too long: .* the context window is 96 tokens"):
        session.set_system("the cat " * 200)
    assert session.system is None


def broken_model_dirs(model_dir: Path, root: Path) -> dict[str, Path]:
    """Copies of `model_dir` with a truncated safetensors file, a config.json that does not match the weights, and
    no tokenizer files (the default 32k tokenizer does not fit the tiny model's vocabulary)."""
    import json
    import shutil

    dirs = {name: root / name for name in ("truncated", "mismatch", "no-tokenizer")}
    for path in dirs.values():
        shutil.copytree(model_dir, path)
    weights = dirs["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = json.loads((dirs["mismatch"] / "config.json").read_text())
    config["intermediate_size"] += 8
    (dirs["mismatch"] / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (dirs["no-tokenizer"] / name).unlink(missing_ok=True)
    return dirs


@pytest.mark.parametrize(
    "broken, message",
    [
        ("truncated", "cannot load the model: Error while deserializing header"),
        ("mismatch", "cannot load the model: the weights' shapes do not match config.json"),
        ("no-tokenizer", "the tokenizer has 32004 tokens but the model only"),
    ],
)
def test_unloadable_model_is_a_one_line_error(model_dir, tmp_path, capsys, broken, message):
    path = broken_model_dirs(model_dir, tmp_path)[broken]
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--model", str(path), "--prompt", "Hi", *GREEDY])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")
    if broken == "no-tokenizer":
        assert "using minillm's default tokenizer" in err  # the fallback is said, not silent


def test_seed_out_of_range_is_refused(model_dir, capsys):
    from minillm.inference.sampling import MAX_SEED

    for seed in (2**70, -1):
        with pytest.raises(SystemExit) as exit_info:
            main(["chat", "--model", str(model_dir), "--prompt", "Hi", "--seed", str(seed), *GREEDY])
        assert exit_info.value.code == 2
        assert "--seed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seed must be in"):
        SamplingParams(seed=MAX_SEED + 1)
