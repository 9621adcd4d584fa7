"""Train the three architectures on the same data for the same number of tokens and compare what they learned.

    python scripts/compare_architectures.py --data data/pretrain --out runs/compare        # small presets, 800 steps
    python scripts/compare_architectures.py --data data/pretrain --out runs/compare --steps 2000 --precision fp32
    python scripts/compare_architectures.py --out runs/compare --report-only               # table + plot again

Each model is one `minillm pretrain` into OUT/<model> (the real trainer and its defaults for the preset: the same
data order, batch and learning-rate schedule for every model), then `minillm eval ppl --split val` over every
token of the data's validation split, in windows as long as the training rows. The script prints one row per model
(parameters, tokens, training wall time, tokens/s, last training loss, validation loss, perplexity, bits per byte)
and writes OUT/comparison.json and OUT/comparison.png: validation and training loss against tokens seen and
against training time.

Run again with the same options, the script goes on where it stopped: a model trained and evaluated with these
settings is kept (OUT/<model>/comparison.json records them; other settings are refused: choose another --out or
delete OUT/<model>), one trained but not evaluated is evaluated, and a training stopped by Ctrl-C (which saves its
step) is continued with `--resume latest`; its training time is then not reported. Everything is checked for every
model before any work starts. Wall times are measured around each command, so they include start-up (a few
seconds) and the periodic validation passes. The parameter counts include mini_deepseekv3's training-only MTP
module (0.9M in `small`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minillm.errors import UserError  # noqa: E402
from minillm.models.registry import MODEL_NAMES  # noqa: E402
from minillm.paths import check_output_file, write_output_file  # noqa: E402
from minillm.training import perf  # noqa: E402
from minillm.training.config import read_saved_config  # noqa: E402

MINILLM = [sys.executable, "-m", "cli.main"]  # the CLI of this checkout, whatever `minillm` on PATH is
RECORD = "comparison.json"  # in OUT/<model>: the settings, timings and evaluation of that model's run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; `--data` and `--out` made absolute, as the commands run from another directory's view."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="token shard directory with a val split (`minillm data pretrain "
                   "--val-fraction ...`); required unless --report-only")
    p.add_argument("--out", type=Path, required=True, help="one run directory per model goes here")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=perf.positive_int, default=800, help="optimizer steps per model")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "fp16", "auto"),
                   help="bf16 (default; about 1.7x faster than fp32 on CPUs with bf16 matmuls), fp32, fp16 or auto")
    p.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every `minillm pretrain`, e.g. --train-arg=--lr=1e-3 (repeatable)")
    p.add_argument("--report-only", action="store_true", help="no training: the table and plot of OUT's runs")
    args = p.parse_args(argv)
    if not args.report_only and args.data is None:
        p.error("--data is required unless --report-only")
    args.out = args.out.absolute()
    args.data = args.data.absolute() if args.data is not None else None
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What makes runs comparable: a recorded run is reused only when these match."""
    return {"data": str(args.data), "preset": args.preset, "steps": args.steps, "precision": args.precision,
            "train_args": args.train_arg}


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """OUT/<model>/comparison.json (None before the model's training ended)."""
    path = run_dir / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({err}); delete {run_dir} to train the model again") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a record of this script; delete {run_dir} to train the model again")
    return record


def next_step(args: argparse.Namespace, model: str) -> str:
    """What the comparison still has to do for `model`: `train`, `resume`, `evaluate` or `done`. Raises
    `UserError` for a run directory it cannot use; `check_inputs` asks this for every model before any work."""
    from minillm.training.checkpoint import list_checkpoints

    run_dir = args.out / model
    record = read_record(run_dir)
    if record is not None:
        _check_same(run_dir, record, settings(args))
        return "done" if "eval" in record else "evaluate"
    if not run_dir.exists():
        return "train"
    if (run_dir / "final").is_dir():
        raise UserError(f"{run_dir} holds a finished run this script did not record (its settings are unknown); "
                        "choose another --out or delete it")
    if list_checkpoints(run_dir):
        _check_resumable(args, run_dir)
        return "resume"
    raise UserError(f"{run_dir} holds an unfinished run without a checkpoint to continue from; delete it to train "
                    f"{model} again")


def _check_resumable(args: argparse.Namespace, run_dir: Path) -> None:
    """Raise `UserError` when the stopped run in `run_dir` was started with other settings (the trainer would
    refuse to continue it too, but only when its turn came, after the models before it had trained)."""
    import yaml

    try:
        saved = read_saved_config(run_dir / "config.yaml")
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise UserError(f"{run_dir}: no readable config.yaml ({err}); delete it to train the model again") from None
    if not isinstance(saved, dict):
        raise UserError(f"{run_dir}/config.yaml is not a run's config; delete {run_dir} to train the model again")
    _check_same(run_dir, saved, {"data": str(args.data), "preset": args.preset, "max_steps": args.steps,
                                 "precision": args.precision})


def _check_same(run_dir: Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise `UserError` naming the saved values of `run_dir` that differ from `expected`."""
    differs = [f"{key} {saved.get(key)!r}" for key, value in expected.items() if saved.get(key) != value]
    if differs:
        raise UserError(f"{run_dir} was run with other settings ({', '.join(differs)}); choose another --out or "
                        "delete it")


def check_inputs(args: argparse.Namespace) -> dict[str, str]:
    """Each model's `next_step`, found before any work; raises `UserError` for an unknown preset, data without a
    validation split, an unwritable --out or a run directory that cannot be used."""
    from minillm.data.manifest import PRETRAIN_FORMAT, read_manifest
    from minillm.models.registry import build_config

    check_output_file(args.out / RECORD, "--out")
    if args.report_only:
        return {}
    steps = {}
    for model in args.models:
        build_config(model, args.preset)
        steps[model] = next_step(args, model)
    try:
        splits = read_manifest(args.data, PRETRAIN_FORMAT)["splits"]
    except UserError as err:
        raise UserError(f"--data {err}") from None
    if not splits.get("val", {}).get("tokens"):
        raise UserError(f"--data {args.data}: no val split to compare on; build the data with "
                        "`minillm data pretrain --val-fraction 0.01 ...`")
    return steps


def _run(command: list[str], log: Path) -> float:
    """Run `command` with its output in `log`; returns its wall time. Raises `UserError` when it fails.

    Ctrl-C reaches the command too: the trainer then finishes its step and saves a checkpoint, which the next
    run of this script continues from, so this waits for it instead of killing it."""
    print("$ minillm " + " ".join(command[len(MINILLM):]), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            code = proc.wait()  # a second Ctrl-C stops both at once
    if code in (130, 143):  # the trainer stopped on Ctrl-C / SIGTERM, after saving its step
        raise UserError(f"stopped (output in {log}); run this script again with the same options to continue")
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:]
        raise UserError(f"the command above failed ({code}): {' '.join(tail)} (full output in {log})")
    return time.perf_counter() - start


def train_and_evaluate(args: argparse.Namespace, model: str, step: str) -> dict[str, Any]:
    """Do `step` (`next_step`) and what follows it for `model` in OUT/<model>; returns its record."""
    run_dir = args.out / model
    if step == "done":
        print(f"{model}: trained and evaluated before, kept ({run_dir})")
        return read_record(run_dir)
    if step in ("train", "resume"):
        args.out.mkdir(parents=True, exist_ok=True)
        train_seconds = _run(
            MINILLM + ["pretrain", "--model", model, "--preset", args.preset, "--data", str(args.data),
                       "--max-steps", str(args.steps), "--precision", args.precision, "--output-dir", str(run_dir),
                       *(["--resume", "latest"] if step == "resume" else []), *args.train_arg],
            args.out / f"{model}.log",
        )
        # a continued run's first part is not timed: no training time rather than a wrong one
        record = {"model": model, **settings(args), "train_seconds": train_seconds if step == "train" else None}
        write_output_file(run_dir / RECORD, json.dumps(record, indent=2) + "\n", "--out")
    record = read_record(run_dir)
    eval_json = run_dir / "eval_val.json"
    record["eval_seconds"] = _run(  # in windows of the training rows: eval ppl's default for a run's model
        MINILLM + ["eval", "ppl", "--data", str(args.data), "--split", "val", "--model", str(run_dir / "final"),
                   "--json", str(eval_json), "--overwrite"],
        args.out / f"{model}.eval.log",
    )
    record["eval"] = json.loads(eval_json.read_text())["total"]
    write_output_file(run_dir / RECORD, json.dumps(record, indent=2) + "\n", "--out")
    return record


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's logged steps (`metrics.jsonl`): training entries and validation entries."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarize(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """One row of the table: the record plus sizes and the training curve read from the run directory."""
    from minillm.models.stats import config_stats

    run_dir = out / record["model"]
    config = read_saved_config(run_dir / "config.yaml")
    stats = config_stats(record["model"], config["preset"], seq_len=config["seq_len"], **config["model_args"])
    train = [m for m in _metrics(run_dir) if "loss" in m]
    tokens_per_step = config["global_batch_size"] * config["seq_len"]
    seconds = record["train_seconds"]
    return {
        **record,
        "parameters": stats.total,
        "activated_non_embedding": stats.activated_non_embedding,
        "tokens": record["steps"] * tokens_per_step,
        "tokens_per_s": record["steps"] * tokens_per_step / seconds if seconds else None,
        "last_train_loss": train[-1]["loss"] if train else float("nan"),
        "tokens_per_step": tokens_per_step,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a markdown table (training time and tokens/s are `—` for a run continued after a stop)."""
    print()
    print("| model | parameters (activated non-embedding) | tokens | training time | tokens/s | last train loss "
          "| val loss | val ppl | val bits per byte |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e = r["eval"]
        minutes = f"{r['train_seconds'] / 60:.1f} min" if r["train_seconds"] else "—"
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "—"
        print(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M ({r['activated_non_embedding'] / 1e6:.1f}M) "
              f"| {r['tokens'] / 1e6:.2f}M | {minutes} | {rate} "
              f"| {r['last_train_loss']:.3f} | {e['loss']:.3f} | {e['ppl']:,.1f} | {e['bpb']:.3f} |")


def plot(out: Path, rows: list[dict[str, Any]]) -> Path:
    """Validation and training loss against tokens seen and against training time, one line per model."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        metrics = _metrics(out / row["model"])
        train = [m for m in metrics if "loss" in m]
        val = [m for m in metrics if "val/loss" in m]
        # training time at each logged step, from the logged rates (each entry covers `log_every` steps)
        seconds, elapsed, last_step = {}, 0.0, 0
        for m in train:
            elapsed += (m["step"] - last_step) * row["tokens_per_step"] / m["tokens_per_s"]
            seconds[m["step"]], last_step = elapsed, m["step"]
        line = by_tokens.plot([m["step"] * row["tokens_per_step"] / 1e6 for m in train], [m["loss"] for m in train],
                              alpha=0.35, label=None if val else row["model"])[0]
        color = line.get_color()
        by_tokens.plot([m["step"] * row["tokens_per_step"] / 1e6 for m in val], [m["val/loss"] for m in val], "o-",
                       color=color, label=row["model"] if val else None)
        by_time.plot([seconds[m["step"]] / 60 for m in train], [m["loss"] for m in train], alpha=0.35, color=color,
                     label=None if val else row["model"])
        val_seconds = np.interp([m["step"] for m in val], list(seconds), list(seconds.values()))
        by_time.plot(val_seconds / 60, [m["val/loss"] for m in val], "o-", color=color,
                     label=row["model"] if val else None)
    by_tokens.set_xlabel("tokens seen (millions)")
    by_time.set_xlabel("training time (minutes, from the logged tokens/s)")
    for ax in (by_tokens, by_time):
        ax.set_ylabel("loss (faint: training; dots: validation)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{rows[0]['preset']} presets, same data and schedule")
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Check everything, train and evaluate what is missing (or, with --report-only, nothing), then report."""
    args = parse_args(argv)
    steps = check_inputs(args)
    if args.report_only:
        records = [r for m in args.models if (r := read_record(args.out / m)) is not None and "eval" in r]
        if not records:
            raise UserError(f"--out {args.out}: no finished comparison runs")
        left = sorted(set(args.models) - {r["model"] for r in records})
        if left:
            print(f"not finished, left out: {', '.join(left)}")
    else:
        records = [train_and_evaluate(args, model, step) for model, step in steps.items()]
    rows = [summarize(args.out, r) for r in records]
    print_table(rows)
    write_output_file(args.out / RECORD, json.dumps(rows, indent=2) + "\n", "--out")
    print(f"\nwrote {args.out / RECORD} and {plot(args.out, rows)}")
    return 0


if __name__ == "__main__":
    perf.run_main(main)
