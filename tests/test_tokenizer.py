"""Tokenizer: the shipped default (layout, chat template masks, compression), training one, loading errors."""

from __future__ import annotations

import json
import random

import pytest
from cli_helpers import run_cli, run_cli_err

from minillm.errors import UserError
from minillm.tokenizer import (
    ADDED_TOKENS,
    EOS_TOKEN,
    chars_per_token,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)

WORDS = [
    "model",
    "token",
    "train",
    "data",
    "small",
    "loss",
    "layer",
    "the",
    "a",
    "of",
    "语言",
    "模型",
    "训练",
    "数据",
]


def generated_text(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(5, 30))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def shipped():
    return load_tokenizer()


def test_shipped_tokenizer_layout(shipped):
    from transformers import AutoTokenizer

    assert len(shipped) == 32004
    assert shipped.convert_tokens_to_ids([EOS_TOKEN, *ADDED_TOKENS]) == [0, 32000, 32001, 32002, 32003]
    assert shipped.eos_token == shipped.pad_token == EOS_TOKEN
    again = AutoTokenizer.from_pretrained(str(shipped.name_or_path))  # a plain transformers directory
    assert len(again) == 32004 and again.chat_template == shipped.chat_template
    text = "Hello, world! 你好，世界。 def f(x): return x ** 2\n\tTabs & émojis 🙂"
    assert shipped.decode(shipped(text)["input_ids"]) == text  # byte-level: exact round trip
    assert len(tokenizer_fingerprint(shipped)) == 16


def test_chat_template_marks_assistant_content_and_im_end(shipped):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "我是 minillm。"},
        {"role": "user", "content": "And in English?"},
        {"role": "assistant", "content": "I am minillm.", "reasoning_content": "Translate."},
    ]
    out = shipped.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    text = shipped.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    trained = shipped.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "我是 minillm。<|im_end|><think>\nTranslate.\n</think>\n\nI am minillm.<|im_end|>"
    prompt = shipped.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n")


def test_shipped_compression_on_sample(shipped):
    from minillm.data.builtin import PRETRAIN_SAMPLE

    docs = [json.loads(line)["text"] for line in PRETRAIN_SAMPLE.read_text(encoding="utf-8").splitlines()]
    english = [d for d in docs if d.isascii()]
    chinese = [d for d in docs if not d.isascii()]
    assert chars_per_token(shipped, english) > 3.4
    assert chars_per_token(shipped, chinese) > 1.2  # everyday Chinese; 2.3 on the modern docs corpus


def test_train_tiny_tokenizer_and_cli(tmp_path, capfd):
    tok = train_tokenizer(generated_text(300), tmp_path / "tok", vocab_size=300, show_progress=False)
    assert len(tok) == 304
    assert tok.convert_tokens_to_ids(ADDED_TOKENS) == [300, 301, 302, 303]
    loaded = load_tokenizer(tmp_path / "tok")
    assert (
        tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok) != tokenizer_fingerprint(load_tokenizer())
    )
    assert loaded.decode(loaded("small model 训练 data")["input_ids"]) == "small model 训练 data"

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"body": t}) + "\n" for t in generated_text(200, seed=1)), encoding="utf-8"
    )
    capfd.readouterr()
    code = run_cli("tokenizer", "train", "--data", str(corpus), "--text-column", "body", "--vocab-size", "280",
                   "--out", str(tmp_path / "cli_tok"))
    out, err = capfd.readouterr()  # file descriptors: the Rust trainer writes to fd 1 itself
    assert code == 0 and out == "", (out, err)  # no progress bar's line breaks in a log
    assert len(load_tokenizer(tmp_path / "cli_tok")) == 284
    assert "characters/token" in err and "asked for" not in err
    code = run_cli("tokenizer", "train", "--data", str(corpus), "--text-column", "body", "--vocab-size", "5000",
                   "--out", str(tmp_path / "short_tok"))  # more than this text has merges for
    err = capfd.readouterr().err
    short = load_tokenizer(tmp_path / "short_tok").vocab_size
    assert code == 0 and short < 5000 and f"a vocabulary of {short:,}, not the 5,000 asked for" in err, err
    corpus.write_text('{"body": "fine"}\n"just a string"\n', encoding="utf-8")
    code = run_cli("tokenizer", "train", "--data", str(corpus), "--text-column", "body", "--out", str(tmp_path / "t3"))
    err = capfd.readouterr().err
    assert code == 2 and f"{corpus}:2: the row is a string, not an object with a 'body' field" in err, err


def test_tokenizer_out_is_never_an_unrelated_directory(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in generated_text(100)), encoding="utf-8")
    train = ["tokenizer", "train", "--data", str(corpus), "--vocab-size", "280"]
    notes = tmp_path / "mine" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("keep me")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    cases = {  # --out: what the one-line error says
        "mine": "already exists",
        ".": "is the working directory or holds it",
        "corpus.jsonl": "is a file",
        "corpus.jsonl/tok": "is a file",
        "link": "is a symbolic link",  # rmtree refused it after the training, with a traceback
        "/proc/minillm-tok": "cannot write in /proc",  # root passes permission checks: failed after the training
    }
    for out, message in cases.items():
        for extra in ([], ["--overwrite"]):
            code, err = run_cli_err([*train, "--out", out, *extra], capsys)
            if out == "mine" and extra:  # --overwrite replaces a tokenizer, never a directory holding anything else
                message = "refusing to replace it"
            assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (out, err)
    code, err = run_cli_err([*train[:-1], "257", "--out", "tok"], capsys)  # bytes + <|endoftext|>: no merge
    assert code == 2 and "at least 258 tokens" in err, err
    code, err = run_cli_err(["tokenizer", "train", "--data", "someone/some-dataset", "--out", "tok"], capsys)
    assert code == 2 and "cannot reach the HuggingFace Hub" in err, err  # tests run offline
    assert "glob to --data" in err and "--input" not in err, err  # the option this command has
    assert notes.read_text() == "keep me" and corpus.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "link", "mine"]  # no temporary left
    assert run_cli_err([*train, "--out", "tok"], capsys)[0] == 0
    assert run_cli_err([*train, "--out", "tok"], capsys)[0] == 2
    assert run_cli_err([*train, "--out", "tok", "--overwrite"], capsys)[0] == 0
    assert len(load_tokenizer(tmp_path / "tok")) == 284


def test_an_output_nobody_can_write_is_refused_before_any_work(tmp_path):
    """Permission bits pass for root, who still cannot write in /proc: the check creates and removes a directory."""
    from minillm.paths import check_creatable

    with pytest.raises(UserError, match="--out /proc/minillm-tok: cannot write in /proc"):
        check_creatable("/proc/minillm-tok", "--out")
    check_creatable(tmp_path / "new" / "tok", "--out")
    assert list(tmp_path.iterdir()) == []  # the probe is gone


def test_load_tokenizer_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    # A tokenizer without our special tokens (e.g. someone else's BPE) is refused, naming what is missing.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(generated_text(50), trainers.BpeTrainer(vocab_size=270, show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path / "plain")
    with pytest.raises(UserError, match="lacks the special tokens <\\|endoftext\\|>"):
        load_tokenizer(tmp_path / "plain")
    (tmp_path / "x.txt").write_text("some text\n")
    args = ["data", "pretrain", "--input", str(tmp_path / "x.txt"), "--tokenizer", str(tmp_path / "plain")]
    code, err = run_cli_err([*args, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "plain lacks the special tokens" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_vocabulary_too_large_to_allocate_is_refused(tmp_path):
    """The Rust trainer allocates for the target size: 2^31 tokens aborted the process (SIGABRT)."""
    with pytest.raises(UserError, match="--vocab-size 2147483647 is too large: at most 1,048,576"):
        train_tokenizer(["hello world"] * 10, tmp_path / "tok", vocab_size=2**31 - 1)
    assert not (tmp_path / "tok").exists()


def test_ctrl_c_stops_waiting_for_the_tokenizer_trainer_at_once():
    """The Rust BPE trainer does not return to Python until its merges are done, so Ctrl-C used to wait for the
    whole training. Its work runs in a thread the main thread waits for in short joins: a KeyboardInterrupt there
    ends the wait at once. Errors of the work reach the caller as they were raised."""
    import _thread
    import threading
    import time

    from minillm.tokenizer import run_interruptibly

    timer = threading.Timer(0.3, _thread.interrupt_main)  # what Ctrl-C does to the main thread
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_interruptibly(lambda: time.sleep(30))  # like the trainer: blocked outside Python, GIL released
    assert time.monotonic() - started < 10
    timer.join()

    def fails():
        raise UserError("bad row")

    with pytest.raises(UserError, match="bad row"):
        run_interruptibly(fails)
