"""Checkpoints of a run: `<run>/checkpoints/step_00000100/`, written atomically, the last K kept.

A checkpoint is what `accelerator.save_state` writes (model, optimizer, registered scheduler, every rank's RNG
states; DeepSpeed writes its own sharded engine state) plus `trainer_state.json`: the step, the data sampler's
position and the loop's counters. MoE routing biases are model buffers, so they travel with the model weights.

Atomicity: everything is written into `checkpoints/.tmp-step_.../`, then renamed to its final name by the main
process after all ranks finished writing. A crash mid-save leaves only a `.tmp-*` directory, which is never taken
for a checkpoint ("latest" is the highest complete `step_*`). Rotation deletes only checkpoints of this run that
are older than the newest `keep_last`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minillm.errors import UserError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    base = Path(run_dir) / CHECKPOINTS
    if not base.is_dir():
        return []
    found = [p for p in base.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(
    accelerator,
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    keep_last: int,
    save_extra: Callable[[Path], Any] | None = None,
) -> Path:
    """Save the full training state of `step` (all ranks call this); returns the checkpoint directory.

    `save_extra(directory)` runs on every rank after `save_state`, for state Accelerate does not know about (the
    expert shards of expert parallelism)."""
    base = Path(run_dir) / CHECKPOINTS
    final = base / checkpoint_name(step)
    tmp = base / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        base.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a leftover of a crashed save of this same step
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if save_extra is not None:
        save_extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2), encoding="utf-8")
        if final.exists():  # re-saving a step after a resume: replace the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def set_aside_later_checkpoints(run_dir: Path, step: int) -> Path | None:
    """Resuming from `step` abandons the checkpoints saved after it: they move to `checkpoints.abandoned-<time>/`
    (never deleted), so that rotation (which keeps the highest steps) cannot delete the resumed run's new
    checkpoints in their favour, and `--resume latest` never returns to the abandoned trajectory. Returns where
    they went, or None when there were none. Main process only."""
    later = [c for c in list_checkpoints(run_dir) if int(c.name[len(PREFIX):]) > step]
    if not later:
        return None
    aside = Path(run_dir) / f"{CHECKPOINTS}.abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    for checkpoint in later:
        checkpoint.rename(aside / checkpoint.name)
    return aside


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def find_resume_checkpoint(resume: str, run_dir: Path | None, candidates: list[Path]) -> Path:
    """The checkpoint directory for `--resume`.

    `resume` is `latest` (the newest checkpoint of `run_dir` if given, else of the newest run in `candidates` that
    has one) or a path to a checkpoint or to a run directory (its newest checkpoint).
    """
    if resume == "latest":
        runs = [run_dir] if run_dir is not None else candidates
        best = [cks[-1] for r in runs if (cks := list_checkpoints(r))]
        if not best:
            where = run_dir if run_dir is not None else "the runs directory"
            raise UserError(f"--resume latest: no checkpoint to resume in {where}")
        return max(best, key=lambda p: p.stat().st_mtime)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    cks = list_checkpoints(path)
    if cks:
        return cks[-1]
    raise UserError(f"--resume {resume}: not a checkpoint or a run directory with checkpoints")
