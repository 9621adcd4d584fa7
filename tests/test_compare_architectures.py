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


def test_trains_evaluates_reports_and_goes_on_where_it_stopped(tmp_path):
    import shutil

    data = shards(tmp_path, 0.25)
    (tmp_path / "work").mkdir()
    # relative paths, from a directory that is not the repository's
    args = ["--data", "../shards_0.25", "--out", "compare", "--models", "mini_llama3", "--preset", "tiny",
            "--steps", "4", "--precision", "fp32", "--train-arg=--seq-len=64", "--train-arg=--log-every=1",
            "--train-arg=--eval-every=2", "--train-arg=--save-every=2"]
    out, cwd = tmp_path / "work" / "compare", tmp_path / "work"
    proc = run(*args, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [row] = json.loads((out / "comparison.json").read_text())
    evaluation = json.loads((out / "mini_llama3" / "eval_val.json").read_text())
    assert row["eval"] == evaluation["total"] and row["eval"]["tokens"] > 0
    assert evaluation["max_seq_len"] == 64  # windows as long as the training rows
    manifest = json.loads((data / "manifest.json").read_text())
    val = manifest["splits"]["val"]
    assert row["eval"]["tokens"] == val["tokens"] - 1 - val["documents"]  # all but the first and the eos tokens
    logged = [json.loads(line) for line in (out / "mini_llama3" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in logged if "loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4] and row["last_train_loss"] == train[-1]["loss"]
    assert 3e6 < row["parameters"] < 5e6 and row["train_seconds"] > 0
    assert (out / "comparison.png").stat().st_size > 10_000
    assert "| mini_llama3 | 3.5M" in proc.stdout

    weights = (out / "mini_llama3" / "final" / "model.safetensors").stat().st_mtime_ns
    again = run(*args, cwd=cwd)  # done before: reported again, not retrained
    assert again.returncode == 0 and "trained and evaluated before" in again.stdout
    assert (out / "mini_llama3" / "final" / "model.safetensors").stat().st_mtime_ns == weights

    steps = args.index("--steps") + 1
    changed = run(*args[:steps], "5", *args[steps + 1 :], cwd=cwd)  # other settings: refused, nothing trained
    assert changed.returncode == 2 and "steps 4" in changed.stderr and changed.stderr.count("\n") == 1

    record = json.loads((out / "mini_llama3" / "comparison.json").read_text())
    del record["eval"]  # as if the evaluation had been interrupted
    (out / "mini_llama3" / "comparison.json").write_text(json.dumps(record))
    evaluated = run(*args, cwd=cwd)
    assert evaluated.returncode == 0 and "minillm pretrain" not in evaluated.stdout
    [reevaluated] = json.loads((out / "comparison.json").read_text())
    assert "minillm eval ppl" in evaluated.stdout and reevaluated["eval"] == row["eval"]
    assert reevaluated["train_seconds"] == row["train_seconds"]  # the training's time is kept

    # a training stopped after its step-2 checkpoint: continued from it, its time not reported
    assert [c.name for c in (out / "mini_llama3" / "checkpoints").iterdir()] == ["step_00000002"]
    shutil.rmtree(out / "mini_llama3" / "final")
    (out / "mini_llama3" / "comparison.json").unlink()
    resumed = run(*args, cwd=cwd)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "--resume latest" in resumed.stdout and "| mini_llama3 | 3.5M (0.4M) | 0.00M | — | — |" in resumed.stdout
    [continued] = json.loads((out / "comparison.json").read_text())
    assert continued["train_seconds"] is None
    assert continued["eval"]["loss"] == pytest.approx(row["eval"]["loss"], abs=1e-5)  # the same model again

    report = run("--out", "compare", "--report-only", cwd=cwd)
    assert report.returncode == 0 and "not finished, left out: mini_deepseekv3, mini_qwen3_next" in report.stdout


@pytest.mark.parametrize("case", ["no val split", "missing data", "unfinished run", "unfinished second model",
                                  "unknown preset", "nothing to report", "unreadable record",
                                  "stopped run with other settings", "recorded run of other data"])
def test_bad_input_is_one_line_and_exit_2_before_any_work(case, tmp_path, monkeypatch, capsys):
    import shutil

    from minillm.training import perf

    out = tmp_path / "compare"
    data = str(shards(tmp_path, 0.25))
    argv = {
        "no val split": ["--data", str(shards(tmp_path, 0.0)), "--out", str(out), "--models", "mini_qwen3_next"],
        "missing data": ["--data", str(tmp_path / "missing"), "--out", str(out), "--models", "mini_qwen3_next"],
        "unfinished run": ["--data", data, "--out", str(out), "--models", "mini_llama3"],
        "unfinished second model": ["--data", data, "--out", str(out), "--models", "mini_qwen3_next", "mini_llama3"],
        "unknown preset": ["--data", data, "--out", str(out), "--preset", "huge"],
        "nothing to report": ["--out", str(out), "--report-only"],
        "unreadable record": ["--data", data, "--out", str(out), "--models", "mini_deepseekv3"],
        # both refused before the first model trains
        "stopped run with other settings": ["--data", data, "--out", str(out), "--models", "mini_llama3",
                                            "mini_qwen3_next"],
        "recorded run of other data": ["--data", data, "--out", str(out), "--models", "mini_llama3",
                                       "mini_qwen3_next"],
    }[case]
    (out / "mini_llama3").mkdir(parents=True)  # a run that stopped before its first checkpoint
    (out / "mini_deepseekv3").mkdir(parents=True)
    (out / "mini_deepseekv3" / "comparison.json").write_text("{not json")
    if case == "stopped run with other settings":  # stopped at its step-2 checkpoint of a 10-step run
        (out / "mini_qwen3_next" / "checkpoints" / "step_00000002").mkdir(parents=True)
        (out / "mini_qwen3_next" / "checkpoints" / "step_00000002" / "trainer_state.json").write_text("{}")
        (out / "mini_qwen3_next" / "config.yaml").write_text(
            f"data: {data}\npreset: small\nmax_steps: 10\nprecision: bf16\n")
        shutil.rmtree(out / "mini_llama3")
    if case == "recorded run of other data":
        (out / "mini_qwen3_next").mkdir()
        (out / "mini_qwen3_next" / "comparison.json").write_text(json.dumps(
            {"data": str(tmp_path / "other"), "preset": "small", "steps": 800, "precision": "bf16", "train_args": [],
             "eval": {}}))
        shutil.rmtree(out / "mini_llama3")
    module = load_script()
    monkeypatch.setattr(module, "_run", lambda *a: pytest.fail("a command ran"))
    with pytest.raises(SystemExit) as exit_info:
        perf.run_main(lambda: module.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    if case == "stopped run with other settings":
        assert "max_steps 10" in err
    if case == "recorded run of other data":
        assert "other" in err and "data" in err
