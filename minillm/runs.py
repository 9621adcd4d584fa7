"""Where runs live and how to find the newest one.

A run directory is `<runs_root>/<stage>_<model>_<YYYYmmdd-HHMMSS>/` (stage is `pretrain` or `sft`). It holds the
resolved `config.yaml`, `checkpoints/`, TensorBoard `logs/`, `metrics.jsonl`, `loss_curve.png` and, when the run
finished, `final/`: a HuggingFace model directory (safetensors, config, tokenizer, generation config).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

DEFAULT_RUNS_ROOT = Path(os.environ.get("MINILLM_RUNS", "runs"))
STAGES = ("sft", "pretrain")  # search order: a chat model (SFT) is preferred over a base model


def new_run_dir(stage: str, model: str, root: Path | None = None) -> Path:
    """Path for a new run (not created here)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (root or DEFAULT_RUNS_ROOT) / f"{stage}_{model}_{stamp}"


def finished_runs(stage: str, root: Path | None = None) -> list[Path]:
    """Run directories of `stage` that hold a final model, oldest first."""
    base = root or DEFAULT_RUNS_ROOT
    if not base.is_dir():
        return []
    runs = [p for p in base.glob(f"{stage}_*") if (p / "final" / "config.json").is_file()]
    return sorted(runs, key=lambda p: (p / "final" / "config.json").stat().st_mtime)


def latest_model(stages: tuple[str, ...] = STAGES, root: Path | None = None) -> Path | None:
    """The `final/` model directory of the newest finished run, trying `stages` in order; None if there is none."""
    for stage in stages:
        runs = finished_runs(stage, root)
        if runs:
            return runs[-1] / "final"
    return None
