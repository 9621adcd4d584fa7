"""scripts/compare_architectures.py: trains and evaluates each model once, reports from what the runs left, and
stops with one line on bad input (a short real run of one tiny model; the README's numbers come from real data)."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "compare_architectures.py"
TOKENIZER = ROOT / "minillm" / "assets" / "tokenizer"


def load_script():
    spec = importlib.util.spec_from_file_location("compare_architectures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shards(tmp_path: Path, val_fraction: float) -> Path:
    from minillm.data.pretrain import build_pretrain_shards

    rng = random.Random(3)
    words = "the a model learns from text and data every step of training moves its weights".split()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=60))}) + "\n" for _ in range(40)))
    out = tmp_path / f"shards_{val_fraction}"
    build_pretrain_shards([str(corpus)], out, TOKENIZER, val_fraction=val_fraction, progress=False)
    return out


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_trains_evaluates_and_reports_once(tmp_path):
    data, out = shards(tmp_path, 0.25), tmp_path / "compare"
    args = ["--data", str(data), "--out", str(out), "--models", "mini_llama3", "--preset", "tiny", "--steps", "3",
            "--precision", "fp32", "--train-arg=--seq-len=64", "--train-arg=--log-every=1",
            "--train-arg=--eval-every=3"]
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [row] = json.loads((out / "comparison.json").read_text())
    evaluation = json.loads((out / "mini_llama3" / "eval_val.json").read_text())["total"]
    assert row["eval"] == evaluation and row["eval"]["tokens"] > 0  # every val token, scored once
    assert row["tokens"] == 3 * 8 * 64 and row["steps"] == 3
    assert 3e6 < row["parameters"] < 5e6 and row["last_train_loss"] > 0
    assert (out / "comparison.png").stat().st_size > 10_000
    assert "| mini_llama3 | 3.5M" in proc.stdout
    weights = (out / "mini_llama3" / "final" / "model.safetensors").stat().st_mtime_ns
    again = run(*args, cwd=tmp_path)  # done before: reported again, not retrained
    assert again.returncode == 0 and "done before" in again.stdout
    assert (out / "mini_llama3" / "final" / "model.safetensors").stat().st_mtime_ns == weights
    report = run("--out", str(out), "--report-only", cwd=tmp_path)
    assert report.returncode == 0 and json.loads((out / "comparison.json").read_text()) == [row]


@pytest.mark.parametrize("case", ["no val split", "missing data", "unfinished run", "nothing to report"])
def test_bad_input_is_one_line_and_exit_2_before_training(case, tmp_path, monkeypatch, capsys):
    from minillm.training import perf

    out = tmp_path / "compare"
    argv = {
        "no val split": ["--data", str(shards(tmp_path, 0.0)), "--out", str(out)],
        "missing data": ["--data", str(tmp_path / "missing"), "--out", str(out)],
        "unfinished run": ["--data", str(shards(tmp_path, 0.25)), "--out", str(out), "--models", "mini_llama3"],
        "nothing to report": ["--out", str(out), "--report-only"],
    }[case]
    (out / "mini_llama3").mkdir(parents=True)  # a run that stopped before its evaluation
    module = load_script()
    monkeypatch.setattr(module, "_run", lambda *a: pytest.fail("a command ran"))
    with pytest.raises(SystemExit) as exit_info:
        perf.run_main(lambda: module.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
