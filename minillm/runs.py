"""Where runs live, how to find the newest one, and where a run stands.

A run directory is `<runs_root>/<stage>_<model>_<YYYYmmdd-HHMMSS>/` (stage is `pretrain` or `sft`). It holds the
resolved `config.yaml`, `checkpoints/`, TensorBoard `logs/`, `metrics.jsonl`, `loss_curve.png` and, when the run
finished, `final/`: a HuggingFace model directory (safetensors, config, tokenizer, generation config).

`resolve_model_dir` is how every command that takes a model (`chat`, `serve`, `eval`, `sft --model-path`,
`export`) finds it: a model directory, a run directory (its `final/`) or one of a run's checkpoints.
`trained_seq_len` reads the row length such a model was trained at from its run's `config.yaml`.
A training process holds `lock_run_dir`'s lock on its run directory while it writes there. `run_progress` reads
where a run stands (finished, training now, or stopped and resumable) from those files, for `minillm info RUN_DIR`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from minillm.errors import UserError

DEFAULT_RUNS_ROOT = Path(os.environ.get("MINILLM_RUNS", "runs"))
STAGES = ("sft", "pretrain")  # search order: a chat model (SFT) is preferred over a base model
FINAL = "final"  # in a run directory: the finished model, written last


def finished_run(run_dir: Path) -> bool:
    """Whether the run in `run_dir` has finished: it wrote its final model (the last thing a run does)."""
    return (Path(run_dir) / FINAL / "config.json").is_file()


RUN_LOCK = ".lock"  # in a run directory: locked by the process training into it


def lock_run_dir(run_dir: Path) -> IO | None:
    """Take the exclusive lock of `run_dir` (created if missing) for this process, which keeps it until it ends,
    however it ends: a second `pretrain --overwrite` or `--resume` of a run still being written is refused, instead
    of moving the live run's checkpoints aside and interleaving the two runs' metrics. Returns the open lock file
    (keep it referenced: closing it releases the lock); None where the system has no file locks."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / RUN_LOCK, "a+", encoding="utf-8")  # noqa: SIM115  (held for the whole run)
    for attempt in range(40):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if lock_holder(run_dir) is None and attempt < 39:  # only readers (`minillm info`), for a moment
                time.sleep(0.05)
                continue
            handle.close()
            raise UserError(live_run_problem(run_dir) or f"{run_dir}: another process has held this run's lock for "
                            "reading for over 2 s (minillm info?); try again once it has ended") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def lock_holder(run_dir: Path) -> str | None:
    """The pid of the process that holds `run_dir`'s lock ("" when it has not written it yet), or None when no
    process does. Writes nothing: a shared lock is refused while the trainer holds its exclusive one."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    try:
        handle = open(run_dir / RUN_LOCK, encoding="utf-8")  # noqa: SIM115  (closed below)
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return handle.read().strip()
    return None


def live_run_problem(run_dir: Path) -> str | None:
    """Why `run_dir` may not be trained into now (another process holds its lock), or None; writes nothing."""
    pid = lock_holder(run_dir)
    if pid is None:
        return None
    return (f"{run_dir}: another training process{f' (pid {pid})' if pid else ''} is writing this run; wait for it "
            "to end or stop it")


def resume_command(stage: str, run_dir: Path) -> str:
    """The command that continues the run in `run_dir` with its own options (said when a run stops, and by
    `minillm info`)."""
    return f"minillm {stage} --config {run_dir / 'config.yaml'} --resume {run_dir}"


def new_run_dir(stage: str, model: str, root: Path | None = None) -> Path:
    """Path for a new run (not created here)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (root or DEFAULT_RUNS_ROOT) / f"{stage}_{model}_{stamp}"


def finished_runs(stage: str, root: Path | None = None) -> list[Path]:
    """Run directories of `stage` that hold a final model, oldest first."""
    base = root or DEFAULT_RUNS_ROOT
    if not base.is_dir():
        return []
    runs = [p for p in base.glob(f"{stage}_*") if finished_run(p)]
    return sorted(runs, key=lambda p: (p / FINAL / "config.json").stat().st_mtime)


def latest_model(stages: tuple[str, ...] = STAGES, root: Path | None = None) -> Path | None:
    """The `final/` model directory of the newest finished run, trying `stages` in order; None if there is none."""
    for stage in stages:
        runs = finished_runs(stage, root)
        if runs:
            return runs[-1] / "final"
    return None


NO_MODEL_HINT = (
    "no trained model found under {root}/: train one with `minillm pretrain` (then `minillm sft`), "
    "or pass --model PATH to a model directory"
)


def resolve_model_dir(path: str | Path | None, option: str | None = "--model", root: Path | None = None) -> Path:
    """The model directory `path` names, checked before anything heavy is imported:

    - a model directory (`config.json` beside its weights), or a checkpoint of a run (`checkpoints/step_*`, which
      holds a `config.json` and loads through `minillm.training.checkpoint.load_checkpoint_model`);
    - a run directory: its `final/` model;
    - None: the newest finished run's model (SFT before pretraining).

    `option` names the option in the one-line errors (None: a positional argument, the path alone).
    """
    from minillm.training.checkpoint import is_checkpoint, list_checkpoints

    if path is None:
        found = latest_model(root=root)
        if found is None:
            raise UserError(NO_MODEL_HINT.format(root=root or DEFAULT_RUNS_ROOT))
        return found
    p = Path(path)
    where = f"{option} {path}" if option else str(path)
    if not p.exists():
        raise UserError(f"{where}: no such directory")
    if (p / "config.json").is_file():
        return p
    if is_checkpoint(p):
        raise UserError(f"{where}: a checkpoint saved by an older minillm (no config.json); resume its run to finish "
                        "it, then use the run's final/")
    if finished_run(p):
        return p / FINAL
    checkpoints = list_checkpoints(p)
    if checkpoints:
        raise UserError(f"{where}: the run has not finished (no final/); pass one of its checkpoints, the newest "
                        f"is {checkpoints[-1]}")
    raise UserError(f"{where}: not a model directory (no config.json), a finished run (final/) or a checkpoint")


def trained_seq_len(model_dir: str | Path) -> int | None:
    """The `seq_len` of the pretraining run a model directory belongs to (its `final/` or one of its checkpoints),
    read from the run's `config.yaml`; for an SFT run, that of the model it started from (`model_path`), so a model
    and its fine-tuned version are scored alike. None for a model outside a run (an export, a download) or an
    unreadable config.

    A model has learned positions up to that length only: `max_position_embeddings` is what it could be trained
    at, and scoring in longer windows measures extrapolation (README: 0.32 nats worse at 1,024 than at the 256 a
    small model was trained at). A model directory written by `minillm export` (either way) carries the length of
    the model it was converted from in its config.json (`{"minillm": {"trained_seq_len": N}}`), so the same
    weights are scored alike after a conversion."""
    for _ in range(8):  # an SFT of an SFT ... model; a config that names its own run ends here
        found = _run_config(Path(model_dir))
        if found is None:
            return _recorded_seq_len(Path(model_dir))
        run_dir, config = found
        if config["stage"] != "sft":
            seq_len = config.get("seq_len")
            return seq_len if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > 0 else None
        start = config.get("model_path")
        if not isinstance(start, str):
            return None
        model_dir = Path(start)
        if not model_dir.is_absolute() and not model_dir.exists():
            # older runs recorded the default start relative to the directory SFT ran in, the one above runs/
            model_dir = run_dir.parent.parent / model_dir
    return None


TRAINED_SEQ_LEN_KEY = ("minillm", "trained_seq_len")  # where an exported config.json records `trained_seq_len`


def _recorded_seq_len(model_dir: Path) -> int | None:
    """The `trained_seq_len` an export recorded in `model_dir/config.json`, or None."""
    import json

    try:
        value = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        for key in TRAINED_SEQ_LEN_KEY:
            value = value[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _run_config(model_dir: Path) -> tuple[Path, dict] | None:
    """(run directory, its config.yaml) of a run's `final/`, checkpoint or the run directory itself; None when
    `model_dir` is not in a run or the file is not a run's config (it names the stage)."""
    from minillm.training.checkpoint import CHECKPOINTS

    model_dir = model_dir.resolve()
    if (model_dir / "final").is_dir():  # a run directory stands for its final model, as in resolve_model_dir
        model_dir = model_dir / "final"
    if model_dir.parent.name == CHECKPOINTS:
        run_dir = model_dir.parent.parent
    elif model_dir.name == "final":
        run_dir = model_dir.parent
    else:
        return None
    config = _read_run_config(run_dir)
    return None if config is None else (run_dir, config)


def _read_run_config(run_dir: Path) -> dict | None:
    """The `config.yaml` of the run in `run_dir`; None when there is none or it is not a run's (it names the
    stage)."""
    import yaml

    from minillm.training.config import read_saved_config

    try:
        config = read_saved_config(run_dir / "config.yaml")
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) and config.get("stage") in STAGES else None


@dataclass
class RunProgress:
    """Where a run stands, read from its directory (see `run_progress`)."""

    run_dir: Path
    config: dict[str, Any]  # its config.yaml
    state: str  # "finished", "training" (another process holds the run's lock) or "stopped"
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    checkpoints: list[Path] = field(default_factory=list)  # oldest first
    checkpoint_steps: dict[Path, int] = field(default_factory=dict)  # of the checkpoints whose state is readable
    total_steps: int | None = None  # the run's planned steps, where its files record them
    holder_pid: str | None = None  # state "training": the pid of the training process ("" if not known)
    launch: dict[str, Any] | None = None  # the newest checkpoint's launch layout (processes, ZeRO stage)

    @property
    def last_step(self) -> int:
        """The last step logged (0 before the first log)."""
        return self.records[-1]["step"] if self.records else 0

    @property
    def training_seconds(self) -> float:
        """Time spent training over all of the run's starts: a resumed run logs `elapsed_s` on from its checkpoint's,
        where runs before that started it again from 0."""
        total, previous = 0.0, 0.0
        for record in self.records:
            elapsed = record.get("elapsed_s")
            if not isinstance(elapsed, (int, float)):
                continue
            if elapsed < previous:  # a resume started the clock again
                total += previous
            previous = elapsed
        return total + previous

    @property
    def model_dir(self) -> Path | None:
        """The model the run has to show: its `final/`, else its newest checkpoint, else None."""
        if self.state == "finished":
            return self.run_dir / "final"
        return self.checkpoints[-1] if self.checkpoints else None

    def latest(self, key: str) -> tuple[int, float] | None:
        """(step, value) of the last record holding `key`, or None."""
        for record in reversed(self.records):
            if isinstance(record.get(key), (int, float)):
                return record["step"], float(record[key])
        return None

    def best(self, key: str) -> tuple[int, float] | None:
        """(step, value) of the lowest value of `key` logged (the first such step), or None."""
        found = [(r[key], r["step"]) for r in self.records
                 if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not found:
            return None
        value, step = min(found)
        return step, float(value)


def run_progress(run_dir: str | Path) -> RunProgress | None:
    """Where the run in `run_dir` stands, read from its files without loading a model; None when `run_dir` is not a
    run directory (no `config.yaml` that names a stage). A run is "training" while a process holds its lock,
    "finished" once it has a `final/` model, else "stopped" (killed, interrupted or failed): resumable from its
    newest checkpoint if it has one."""
    from minillm.training.checkpoint import list_checkpoints, read_trainer_state
    from minillm.training.metrics import read_metrics

    run_dir = Path(run_dir)
    config = _read_run_config(run_dir)
    if config is None:
        return None
    holder_pid = lock_holder(run_dir)
    if holder_pid is not None:
        state = "training"
    elif finished_run(run_dir):
        state = "finished"
    else:
        state = "stopped"
    progress = RunProgress(run_dir, config, state, read_metrics(run_dir / "metrics.jsonl"),
                           list_checkpoints(run_dir), holder_pid=holder_pid)
    for checkpoint in progress.checkpoints:
        try:
            trainer_state = read_trainer_state(checkpoint)
            progress.checkpoint_steps[checkpoint] = int(trainer_state["step"])
        except (OSError, ValueError, KeyError, TypeError):  # a damaged checkpoint: listed, without its step
            continue
        if isinstance(trainer_state.get("launch"), dict):
            progress.launch = trainer_state["launch"]
        total = trainer_state.get("total_steps")
        if isinstance(total, int) and not isinstance(total, bool) and total > 0:
            progress.total_steps = total  # runs from before it was recorded leave it unknown
    if state == "finished" and progress.records:
        progress.total_steps = progress.last_step  # the last step is always logged
    return progress
