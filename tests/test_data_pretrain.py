"""Pretraining data: shards from parquet/jsonl/txt, the windowed dataset, the resumable sampler, bad input."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_helpers import run_cli, run_cli_err

from minillm.data.pretrain import PretrainDataset, build_pretrain_shards, check_shards_match
from minillm.data.sampler import ResumableSampler
from minillm.errors import UserError
from minillm.tokenizer import load_tokenizer, train_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "model", "data", "的", "模型", "数据", "训练", "，", "。"]


def docs(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same 60 documents spread over a parquet, a jsonl and a txt file."""
    d = tmp_path_factory.mktemp("corpus")
    texts = docs(60)
    pq.write_table(pa.table({"text": texts[:20], "other": list(range(20))}), d / "a.parquet")
    (d / "b.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts[20:40]), encoding="utf-8"
    )
    (d / "c.txt").write_text("\n\n".join(texts[40:]) + "\n", encoding="utf-8")
    return d, texts


def test_shards_hold_every_document_followed_by_eos(corpus, tok, tmp_path, capsys):
    d, texts = corpus
    code, err = run_cli_err(
        [
            "data",
            "pretrain",
            "--input",
            str(d / "*"),
            "--out",
            str(tmp_path / "shards"),
            "--val-fraction",
            "0.1",
            "--shard-tokens",
            "300",
        ],
        capsys,
    )
    assert code == 0, err
    m = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["vocab_size"] == 32004 and m["documents"] == 60
    assert m["splits"]["val"]["documents"] == 6 and m["splits"]["train"]["documents"] == 54
    assert len(m["splits"]["train"]["files"]) > 1  # 300-token shards
    assert [s["path"].rsplit("/", 1)[-1] for s in m["sources"]] == ["a.parquet", "b.jsonl", "c.txt"]
    expected = {"train": [], "val": []}
    for i, t in enumerate(texts):  # every 10th document (i = 9, 19, ...) is held out
        expected["val" if (i + 1) % 10 == 0 else "train"] += tok(t)["input_ids"] + [tok.eos_token_id]
    for split in ("train", "val"):
        stream = np.concatenate(
            [
                np.fromfile(tmp_path / "shards" / f["name"], dtype=np.uint16)
                for f in m["splits"][split]["files"]
            ]
        )
        assert stream.tolist() == expected[split]
        assert m["splits"][split]["tokens"] == len(expected[split])
    assert m["tokens"] == len(expected["train"]) + len(expected["val"])
    with pytest.raises(UserError, match="rebuild it with a larger --val-fraction"):  # says how to get a usable one
        PretrainDataset(tmp_path / "shards", seq_len=len(expected["val"]) + 1, split="val")


def test_dataset_windows_span_shards_and_stride(corpus, tok, tmp_path):
    d, texts = corpus
    build_pretrain_shards([str(d / "a.parquet")], tmp_path / "s", shard_tokens=50, progress=False)
    stream = []
    for t in texts[:20]:
        stream += tok(t)["input_ids"] + [0]
    ds = PretrainDataset(tmp_path / "s", seq_len=32)
    assert len(ds) == (len(stream) - 32) // 32 + 1
    for i in (0, 1, len(ds) - 1):  # windows crossing the 50-token shard borders included
        item = ds[i]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (32,)
        assert item["input_ids"].tolist() == stream[i * 32 : i * 32 + 32]
        assert torch.equal(item["labels"], item["input_ids"])
    overlapped = PretrainDataset(tmp_path / "s", seq_len=32, stride=28)
    assert overlapped[1]["input_ids"].tolist() == stream[28:60]
    with pytest.raises(UserError, match="no 'val' split"):
        PretrainDataset(tmp_path / "s", seq_len=32, split="val")
    with pytest.raises(UserError, match="fewer than seq_len"):
        PretrainDataset(tmp_path / "s", seq_len=10**6)


def test_sampler_is_seeded_and_resumes_exactly():
    a = ResumableSampler(100, seed=3)
    epoch0 = list(a)
    epoch1 = list(a)
    assert sorted(epoch0) == list(range(100)) and epoch0 != epoch1
    assert epoch0 == list(ResumableSampler(100, seed=3))
    b = ResumableSampler(100, seed=3)
    it = iter(b)
    first = [next(it) for _ in range(37)]
    state = b.state_dict()
    c = ResumableSampler(100, seed=3)
    c.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    assert len(c) == 63
    assert first + list(c) == epoch0 and list(c) == epoch1
    with pytest.raises(ValueError):
        ResumableSampler(50).load_state_dict(state)


def test_bad_inputs_exit_2_with_one_line_and_leave_nothing(corpus, tmp_path, capsys):
    d, _ = corpus
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file at all")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "numbers.parquet")
    (tmp_path / "numbers.jsonl").write_text('{"text": "fine"}\n{"text": 12345}\n', encoding="utf-8")
    (tmp_path / "config.json").write_text('{\n  "text": "one object over lines"\n}\n', encoding="utf-8")
    cases = [
        ([str(tmp_path / "numbers.parquet")], [], "column 'text' holds int64, not text"),
        ([str(tmp_path / "numbers.jsonl")], [], "numbers.jsonl:2: field 'text' is int, not text"),
        ([str(tmp_path / "missing.parquet")], [], "missing.parquet: no such file"),
        ([str(tmp_path / "*.nothing")], [], "*.nothing: the glob matches no files"),
        ([str(tmp_path / "broken.parquet")], [], "broken.parquet: cannot read as parquet"),
        ([str(d / "a.parquet")], ["--text-column", "body"], "no column 'body' (columns found: text, other)"),
        ([str(tmp_path / "empty.parquet")], [], "empty.parquet: no documents found"),
        ([str(d / "a.parquet")], ["--tokenizer", str(tmp_path / "no_tok")], "no_tok does not exist"),
        ([str(d / "a.parquet")], ["--tokenizer", str(d / "a.parquet")], "a.parquet: a file; give the directory"),
        ([str(tmp_path / "config.json")], [], "expected one JSON row per line or one array of rows"),
        (["someone/some-dataset"], [], "someone/some-dataset: cannot reach the HuggingFace Hub"),
        ([str(d / "a.parquet")], ["--shard-tokens", "0"], "--shard-tokens 0: must be positive"),
        ([str(d / "a.parquet")], ["--val-fraction", "0.01"], "too few documents (20) for a validation split: it "
                                                             "needs at least 100 at this fraction"),
    ]
    for inputs, extra, message in cases:
        out = tmp_path / "out"
        args = ["data", "pretrain", "--out", str(out), *extra]
        for i in inputs:
            args += ["--input", i]
        code = run_cli(*args)
        stdout, err = capsys.readouterr()
        assert stdout == ""  # not even the line break of a progress bar that ended
        assert code == 2, (message, err)
        assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert (
        "pass a local file, directory or glob to --input"
        in run_cli_err(["data", "pretrain", "--input", "someone/x", "--out", str(out)], capsys)[1]
    )
    # the folders made for a nested --out go too when the build fails (bad rows are found while writing)
    code, err = run_cli_err(["data", "pretrain", "--input", str(tmp_path / "numbers.jsonl"), "--out",
                             str(tmp_path / "new" / "sub" / "out")], capsys)  # fmt: skip
    assert code == 2 and not (tmp_path / "new").exists(), err


def test_shard_checks_against_tokenizer_and_model(corpus, tok, tmp_path):
    d, _ = corpus
    build_pretrain_shards([str(d / "b.jsonl")], tmp_path / "s", progress=False)
    check_shards_match(tmp_path / "s", tok, vocab_size=32004, max_seq_len=64, model_max_len=128)
    with pytest.raises(UserError, match="token id .* vocab_size is 1000"):
        check_shards_match(tmp_path / "s", tok, vocab_size=1000)
    with pytest.raises(UserError, match="max_seq_len 256 is larger than the model's maximum"):
        check_shards_match(tmp_path / "s", tok, max_seq_len=256, model_max_len=128)
    other = train_tokenizer(docs(100, seed=5), tmp_path / "tiny_tok", vocab_size=300, show_progress=False)
    with pytest.raises(UserError, match="fingerprint .* rebuild the data"):
        check_shards_match(tmp_path / "s", other)
    # token ids beyond the vocabulary written into the data itself (manifest not updated) are found by the scan
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    shard = tmp_path / "s" / manifest["splits"]["train"]["files"][0]["name"]
    data = np.fromfile(shard, dtype=np.uint16)
    data[3] = 40000
    data.tofile(shard)
    with pytest.raises(UserError, match="train_00000.bin: holds token id 40000"):
        check_shards_match(tmp_path / "s", tok, vocab_size=32004)
    # a shard whose size does not match the manifest (truncated copy)
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(UserError, match="manifest says .* tokens"):
        PretrainDataset(tmp_path / "s", seq_len=8)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: {"format": m["format"]}, "malformed (no field 'dtype')"),
    (lambda m: {**m, "splits": "x"}, "malformed ("),
    (lambda m: [m], "not a manifest (a JSON object)"),
])
def test_a_malformed_manifest_is_one_line(corpus, tmp_path, edit, message):
    """A hand-edited manifest with a field missing or of the wrong type raised KeyError / AttributeError."""
    d, _ = corpus
    build_pretrain_shards([str(d / "b.jsonl")], tmp_path / "s", progress=False)
    path = tmp_path / "s" / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(UserError, match=f"manifest.json: {re.escape(message)}"):
        PretrainDataset(tmp_path / "s", seq_len=8)


def test_datasets_pickle_without_token_data(corpus, tmp_path):
    import pickle

    d, _ = corpus
    build_pretrain_shards([str(d / "a.parquet")], tmp_path / "s", progress=False)
    ds = PretrainDataset(tmp_path / "s", seq_len=16)
    first = ds[0]["input_ids"]
    blob = pickle.dumps(ds)  # what a spawned DataLoader worker receives
    assert len(blob) < 4096 and torch.equal(pickle.loads(blob)[0]["input_ids"], first)


def test_existing_output_is_kept_unless_overwrite(corpus, tmp_path, capsys):
    d, _ = corpus
    args = ["data", "pretrain", "--input", str(d / "b.jsonl"), "--out", str(tmp_path / "s")]
    assert run_cli_err(args, capsys)[0] == 0
    before = (tmp_path / "s" / "manifest.json").read_text()
    code, err = run_cli_err(args, capsys)
    assert code == 2 and "already exists" in err and (tmp_path / "s" / "manifest.json").read_text() == before
    assert run_cli_err([*args, "--overwrite"], capsys)[0] == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    code, err = run_cli_err([*args[:-1], str(tmp_path / "mine"), "--overwrite"], capsys)
    assert code == 2 and "not a minillm data directory" in err and (tmp_path / "mine" / "notes.txt").exists()
    # a manifest.json alone does not make a directory ours: it used to be replaced, the user's files with it
    (tmp_path / "mine" / "manifest.json").write_text("{}")
    code, err = run_cli_err([*args[:-1], str(tmp_path / "mine"), "--overwrite"], capsys)
    assert code == 2 and "not minillm-pretrain-shards" in err and (tmp_path / "mine" / "notes.txt").exists()
    # our own data with a file added beside it
    (tmp_path / "s" / "notes.txt").write_text("user data")
    code, err = run_cli_err([*args, "--overwrite"], capsys)
    assert code == 2 and "also holds notes.txt" in err and (tmp_path / "s" / "notes.txt").exists()
    # the SFT builder does not replace pretraining data
    (tmp_path / "s" / "notes.txt").unlink()
    (tmp_path / "chats.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    code, err = run_cli_err(
        ["data", "sft", "--input", str(tmp_path / "chats.jsonl"), "--out", str(tmp_path / "s"), "--overwrite"], capsys
    )
    assert code == 2 and "holds minillm-pretrain-shards data, not minillm-sft" in err
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["format"] == "minillm-pretrain-shards"


def test_the_working_directory_is_not_an_output(corpus, tmp_path, capsys, monkeypatch):
    """`--out .` used to do all the work, fail to rename the working directory and leave a `..old-` folder."""
    d, _ = corpus
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out in (".", ".."):
        code, err = run_cli_err(["data", "pretrain", "--input", str(d / "b.jsonl"), "--out", out], capsys)
        assert code == 2 and "is the working directory or holds it" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"] and not any((tmp_path / "here").iterdir())


def test_what_text_files_hold(tok, tmp_path):
    """Byte-order marks are not text; whitespace-only rows are no documents; special-token strings stay text; an
    unpaired surrogate escape is named by file and line; a file name with brackets is a file, not a glob."""
    bom = "\ufeff"
    (tmp_path / "a.txt").write_text(bom + "    indented first line\nsecond\n\n   \n\nnext doc\n", encoding="utf-8")
    rows = [{"text": "one <|endoftext|> two <|im_end|>"}, {"text": "   \n "}, {"text": "three"}]
    (tmp_path / "b[2024].jsonl").write_text(bom + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "c.json").write_text(bom + json.dumps([{"text": "array row"}]), encoding="utf-8")
    inputs = [str(tmp_path / name) for name in ("a.txt", "b[2024].jsonl", "c.json")]
    manifest = build_pretrain_shards(inputs, tmp_path / "s", progress=False)
    data = np.concatenate(
        [np.fromfile(tmp_path / "s" / f["name"], dtype=np.uint16) for f in manifest["splits"]["train"]["files"]]
    )
    ends = np.flatnonzero(data == tok.eos_token_id)  # one EOS after each document, none inside one
    texts = [tok.decode(data[a + 1 : b].tolist()) for a, b in zip([-1, *ends[:-1]], ends, strict=True)]
    assert texts == [
        "    indented first line\nsecond",
        "next doc",
        "one <|endoftext|> two <|im_end|>",
        "three",
        "array row",
    ]
    assert manifest["splits"]["train"]["documents"] == 5 and ends[-1] == len(data) - 1
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\ud800 x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d.jsonl:2: text holds an unpaired surrogate \(\\ud800\)"):
        build_pretrain_shards([str(tmp_path / "d.jsonl")], tmp_path / "s2", progress=False)
    assert not (tmp_path / "s2").exists()
    # the same surrogate written out as bytes (CESU-8 / WTF-8 dumps), which json.loads lets through: it was a
    # TypeError traceback from the tokenizer; in a line and in a JSON array
    (tmp_path / "e.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "raw \xed\xa0\x80 x"}\n')
    (tmp_path / "f.json").write_bytes(b'[{"text": "fine"}, {"text": "raw \xed\xa0\x80 x"}]')
    for name, where in (("e.jsonl", "e.jsonl:2"), ("f.json", "f.json:2")):
        with pytest.raises(UserError, match=rf"{where}: text holds an unpaired surrogate \(\\ud800\)"):
            build_pretrain_shards([str(tmp_path / name)], tmp_path / "s2", progress=False)
    korean = _write(tmp_path / "k.jsonl", '{"text": "한국어"}\n')  # Hangul (ED 95 9C ...) holds no surrogate
    assert build_pretrain_shards([str(korean)], tmp_path / "s3", progress=False)["splits"]["train"]["documents"] == 1


def test_a_mistyped_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from minillm.data.sources import resolve_inputs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("minillm.data.sources.check_on_hub", lambda name, flag: None)  # tests run offline
    (tmp_path / "corpus").mkdir()
    with pytest.raises(UserError, match="corpus/train: no such file"):
        resolve_inputs(["corpus/train"])  # ./corpus exists: a typo for a local file, not a dataset "corpus/train"
    assert [(s.kind, s.name) for s in resolve_inputs(["someone/dataset"])] == [("hf", "someone/dataset")]


def test_data_built_inside_its_input_directory_is_not_read_as_input(tmp_path):
    """`--input corpus --out corpus/shards` then a rebuild: the second build used to read the first one's
    manifest.json as a text file and fail. Hidden folders are not read either; a user's own manifest.json is."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "one document"}\n', encoding="utf-8")
    (corpus / ".cache").mkdir()
    (corpus / ".cache" / "b.jsonl").write_text('{"text": "hidden"}\n', encoding="utf-8")
    for overwrite in (False, True):
        manifest = build_pretrain_shards([str(corpus)], corpus / "shards", overwrite=overwrite, progress=False)
        assert manifest["documents"] == 1
    (corpus / "meta").mkdir()
    (corpus / "meta" / "manifest.json").write_text('{"text": "a user file that happens to have this name"}\n')
    assert build_pretrain_shards([str(corpus)], tmp_path / "s2", progress=False)["documents"] == 2


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_sigterm_mid_build_leaves_nothing_behind(tmp_path):
    """`kill` (SIGTERM) while the shards are written: the temporary directory is removed as after Ctrl-C (by
    default SIGTERM ended the process on the spot and left it); exit code 143."""
    import os
    import signal
    import subprocess
    import sys
    import time

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    line = json.dumps({"text": " ".join(words * 40)}) + "\n"
    (tmp_path / "big.jsonl").write_text(line * 40_000, encoding="utf-8")  # about 50 MB: seconds to tokenize
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cli.main", "data", "pretrain", "--input", str(tmp_path / "big.jsonl"), "--out",
           str(out)]  # fmt: skip
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*/*.bin")):  # writing has begun
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def test_a_file_named_twice_is_read_once(tmp_path, capsys):
    """`--input a.jsonl --input '*.jsonl'`: read twice, its documents were trained twice and, with a val split,
    the same text landed in train and val."""
    from minillm.data.sources import resolve_inputs

    a = _write(tmp_path / "a.jsonl", '{"text": "x"}\n')
    b = _write(tmp_path / "b.jsonl", '{"text": "y"}\n')
    sources = resolve_inputs([str(a), str(a), str(tmp_path / "*.jsonl"), str(tmp_path)])
    assert [s.name for s in sources] == [str(a), str(b)]
    err = capsys.readouterr().err
    assert err.count("is given more than once; it is read once") == 2 and f"note: {a} " in err


def test_a_dictionary_encoded_text_column_is_text(tok, tmp_path):
    """What pandas writes for a `category` column: strings stored once, referenced by index."""
    texts = ["the same sentence", "another one", "the same sentence"]
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), tmp_path / "cat.parquet")
    manifest = build_pretrain_shards([str(tmp_path / "cat.parquet")], tmp_path / "s", progress=False)
    assert manifest["splits"]["train"]["documents"] == 3
