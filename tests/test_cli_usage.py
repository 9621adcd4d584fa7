"""A bad command line (unknown command or option, a value of the wrong type or out of range) is one line on stderr
with exit code 2, like every other bad input; help still works."""

from __future__ import annotations

import pytest
from cli_helpers import run_cli, run_cli_err

BAD_COMMAND_LINES = {
    "unknown command": (["nosuch"], "No such command 'nosuch'", "`minillm --help`"),
    "unknown option": (["pretrain", "--nosuch"], "No such option: --nosuch", "`minillm pretrain --help`"),
    "not an integer": (["pretrain", "--max-steps", "abc"], "'--max-steps'", "`minillm pretrain --help`"),
    "out of range": (["chat", "--temperature", "-1"], "'--temperature'", "`minillm chat --help`"),
    "missing option": (["tokenizer", "train", "--out", "x"], "--data", "`minillm tokenizer train --help`"),
    "option without its value": (["info", "--model"], "Option '--model' requires an argument",
                                 "`minillm info --help`"),
    "nested option without its value": (["data", "sft", "--input", "x", "--val-fraction"],
                                        "Option '--val-fraction' requires an argument", "`minillm data sft --help`"),
}


@pytest.mark.parametrize("case", list(BAD_COMMAND_LINES))
def test_bad_command_line_is_one_line_and_exit_2(case, capsys):
    argv, expected, hint = BAD_COMMAND_LINES[case]
    code, err = run_cli_err(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0] and hint in lines[0], err


def test_help_and_bare_groups_still_print_help(capsys):
    assert run_cli(*["--help"]) == 0
    assert "pretrain" in capsys.readouterr().out
    code = run_cli("tokenizer")
    shown = capsys.readouterr()
    assert code == 2 and "train" in shown.out + shown.err  # a bare group shows its commands, as click does
    assert (shown.out + shown.err).count("Usage:") == 1  # once


def test_training_help_shows_each_stages_defaults(capsys, monkeypatch):
    """`pretrain --help` and `sft --help` showed no defaults (rich read `[default: ...]` as a markup tag, and the
    stage defaults were not looked up): now the stage's, with the presets that change it."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    assert run_cli("pretrain", "--help") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "peak learning rate [default: 0.003; small: 0.002, base: 0.0003]" in out
    assert "[default: tiny]" in out and "[default: 8]" in out  # the preset; --eval-batches
    assert run_cli("sft", "--help") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "passes over the data when max_steps is not set [default: 4.0]" in out


def test_device_names_mean_the_same_in_every_command(tmp_path, capsys):
    """One resolver for `--device` (chat, serve, eval, benchmarks): `auto` is CUDA, else MPS, else the CPU; a
    device this machine lacks or a name that is no device is one line, exit 2, before any model is loaded."""
    import torch

    from minillm.devices import resolve_device
    from minillm.errors import UserError

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(UserError, match="--device cuda:1: no CUDA GPU is visible to this process"):
            resolve_device("cuda:1")
    with pytest.raises(UserError, match="--device meta: not a device minillm runs on"):
        resolve_device("meta")
    from train_helpers import tiny_llama

    model = tmp_path / "model"
    tiny_llama().save_pretrained(model)
    data = tmp_path / "heldout.jsonl"
    data.write_text('{"text": "a held-out line"}\n')
    for argv in (["chat", "--model", str(model), "--prompt", "hi"], ["eval", "ppl", "--model", str(model), "--data",
                                                                     str(data)]):
        code, err = run_cli_err([*argv, "--device", "gpu0"], capsys)
        assert code == 2 and err.strip() == "error: --device gpu0: not a device name (use auto, cpu, cuda, cuda:N "\
            "or mps)", err
