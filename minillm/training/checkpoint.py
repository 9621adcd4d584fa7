"""Checkpoints of a run: `<run>/checkpoints/step_00000100/`, written atomically, the last K kept.

A checkpoint is what `accelerator.save_state` writes (model, optimizer, registered scheduler, every rank's RNG
states; DeepSpeed writes its own sharded engine state) plus `trainer_state.json`: the step, the data sampler's
position and the loop's counters. MoE routing biases are model buffers, so they travel with the model weights.

A checkpoint is also a model: it holds the model's `config.json`, generation config and tokenizer files (written
with it, as in `final/`), and `load_checkpoint_model` assembles the weights from whichever layout the launch wrote
(`checkpoint_weights`). So `chat`, `eval`, `serve`, `sft --model-path` and `export` take a checkpoint directory
wherever they take a model directory: an unfinished run's model can be tried, compared over steps, or exported.

Atomicity: everything is written into `checkpoints/.tmp-step_.../`, then renamed to its final name by the main
process after all ranks finished writing. A crash mid-save leaves only a `.tmp-*` directory, which is never taken
for a checkpoint ("latest" is the highest complete `step_*`). Rotation deletes only checkpoints of this run that
are older than the newest `keep_last`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm.errors import UserError
from minillm.paths import apply_umask
from minillm.runs import FINAL, finished_run

if TYPE_CHECKING:
    import torch

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


class _TiedHeadNotice(logging.Filter):
    """Drops Accelerate's warning that it stored a tied head once ("Removed shared tensor {'lm_head.weight'}"):
    tied embeddings are the design of these models, and `checkpoint_weights` loads them back tied."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedHeadNotice())


def save_checkpoint(
    accelerator,
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    keep_last: int,
    save_extra: Callable[[Path], Any] | None = None,
    save_model_files: Callable[[Path], Any] | None = None,
) -> Path:
    """Save the full training state of `step` (all ranks call this); returns the checkpoint directory.

    `save_extra(directory)` runs on every rank after `save_state`, for state Accelerate does not know about (the
    expert shards of expert parallelism). `save_model_files(directory)` runs on the main process: the files that
    make the checkpoint loadable as a model (config, generation config, tokenizer)."""
    base = Path(run_dir) / CHECKPOINTS
    final = base / checkpoint_name(step)
    tmp = base / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        base.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a leftover of a crashed save of this same step
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if save_extra is not None:
            save_extra(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if save_model_files is not None:
                save_model_files(tmp)
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2), encoding="utf-8")
            apply_umask(tmp)
            if final.exists():  # re-saving a step after a resume: replace the old copy
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException as err:  # a second Ctrl-C while saving, a full disk: no half-written checkpoint stays
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, KeyboardInterrupt):
                print(f"interrupted while saving the checkpoint of step {step}: it was not kept", file=sys.stderr)
        raise
    if accelerator.is_main_process:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def set_aside_later_checkpoints(run_dir: Path, step: int) -> Path | None:
    """Resuming from `step` abandons the checkpoints saved after it, and the final model of a run that had
    finished: they move to `checkpoints.abandoned-<time>/` (never deleted), so that rotation (which keeps the
    highest steps) cannot delete the resumed run's new checkpoints in their favour, `--resume latest` never returns
    to the abandoned trajectory, and until the branch finishes the run has no final model of another trajectory.
    Returns where they went, or None when there was nothing to move. Main process only."""
    later = [c for c in list_checkpoints(run_dir) if int(c.name[len(PREFIX):]) > step]
    final = Path(run_dir) / FINAL
    if final.is_dir():
        later.append(final)
    if not later:
        return None
    aside = Path(run_dir) / f"{CHECKPOINTS}.abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    for checkpoint in later:
        checkpoint.rename(aside / checkpoint.name)
    return aside


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def describe_launch(layout: dict[str, Any]) -> str:
    """'2 processes, DeepSpeed ZeRO-2' for the `launch` layout a checkpoint's trainer state records."""
    zero = f"DeepSpeed ZeRO-{layout['zero_stage']}" if layout.get("zero_stage") is not None else "no DeepSpeed"
    processes = layout.get("processes", 1)
    return f"{processes} process{'es' if processes != 1 else ''}, {zero}"


def find_resume_checkpoint(resume: str, run_dir: Path | None, candidates: list[Path]) -> Path:
    """The checkpoint directory for `--resume`.

    `resume` is `latest` (the newest checkpoint of `run_dir` if given, else of the newest unfinished run in
    `candidates` that has one) or a path to a checkpoint or to a run directory (its newest checkpoint). A finished
    run (it wrote its `final/` model) has nothing to resume: `latest` or its directory is an error, as resuming would
    train its last steps again and replace its model. One of its checkpoints, named, is a new branch from there
    (`set_aside_later_checkpoints` moves the old trajectory's later checkpoints and model aside).
    """
    path = Path(resume)
    if resume != "latest" and (path / STATE_FILE).is_file():
        return path
    if resume == "latest" and run_dir is None:
        runs = [r for r in candidates if not finished_run(r)]
        best = [cks[-1] for r in runs if (cks := list_checkpoints(r))]
        if not best:
            raise UserError("--resume latest: no checkpoint to resume in the runs directory (finished runs have "
                            "nothing to resume)")
        return max(best, key=lambda p: p.stat().st_mtime)
    run = run_dir if resume == "latest" else path
    cks = list_checkpoints(run)
    if not cks:
        where = f"no checkpoint to resume in {run}" if resume == "latest" else (
            "not a checkpoint or a run directory with checkpoints")
        raise UserError(f"--resume {resume}: {where}")
    if finished_run(run):
        raise UserError(f"--resume {resume}: the run {run} has finished (its model is {run / FINAL}); nothing to "
                        f"resume. To train again from one of its checkpoints, name it: --resume {cks[-1]}")
    return cks[-1]


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint as a model

DEEPSPEED_TAG = "pytorch_model"  # the sub-directory Accelerate gives DeepSpeed's engine state
EXPERT_SHARDS = "experts_ep*-of-*.safetensors"  # `minillm.parallel.expert_parallel.expert_shard_path`
TRAINING_ONLY_PREFIXES = ("mtp.",)  # DeepSeek-V3's multi-token-prediction module: not part of the model (final/)


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint of a minillm run: its `trainer_state.json` is ours (`step` and the data
    position). A Hugging Face Trainer's `checkpoint-N/` has a file of that name too, with other keys, beside an
    ordinary model directory."""
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "step" in state and "data" in state


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights saved in `checkpoint`, on the CPU, named and shaped as the model's own state dict (every
    routed expert present), from whichever layout the launch wrote:

    - one process or DDP: Accelerate's `model.safetensors` (a tied head stored once);
    - DeepSpeed ZeRO-1/2: the module's weights in `pytorch_model/mp_rank_00_model_states.pt`, in the precision the
      run trained them (bf16 under bf16), as `final/` would have them;
    - DeepSpeed ZeRO-3: the parameters are partitioned over the ranks' optimizer states; DeepSpeed's own
      `zero_to_fp32` reassembles them, cast to the run's precision (`_zero3_weights`);
    - expert parallelism: each rank's share of the routed experts in `experts_epXX-of-YY.safetensors`,
      concatenated in rank order over the module's local slice.
    """
    import torch
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    engine = checkpoint / DEEPSPEED_TAG
    if (checkpoint / "model.safetensors").is_file():
        state = load_file(str(checkpoint / "model.safetensors"))
    elif (engine / "mp_rank_00_model_states.pt").is_file():
        state = torch.load(engine / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    elif any(engine.glob("zero_pp_rank_*_model_states.pt")):
        state = _zero3_weights(checkpoint)
    else:
        raise UserError(f"{checkpoint}: holds no model weights (no model.safetensors nor DeepSpeed engine state)")
    shards = sorted(checkpoint.glob(EXPERT_SHARDS))
    if shards:
        state.update(_gathered_experts(checkpoint, shards))
    return state


def _zero3_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """ZeRO-3's partitioned weights, reassembled by DeepSpeed from the fp32 masters and cast to the dtype each
    parameter had in the run (the empty placeholders of rank 0's module state keep it): bf16 under bf16, as the
    16-bit weights `final/` gathers."""
    import contextlib
    import io

    import torch

    # DeepSpeed reports its progress on stdout and stderr; the caller prints what matters
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG))
    placeholders = {}
    for rank_0 in (checkpoint / DEEPSPEED_TAG).glob("zero_pp_rank_0_mp_rank_*_model_states.pt"):
        placeholders = torch.load(rank_0, map_location="cpu", weights_only=True)["module"]
    return {k: v.to(placeholders[k].dtype) if k in placeholders else v for k, v in state.items()}


def _gathered_experts(checkpoint: Path, shards: list[Path]) -> dict[str, torch.Tensor]:
    """The routed-expert tensors of all expert-parallel ranks, concatenated along the expert dimension."""
    import torch
    from safetensors.torch import load_file

    size = max(int(shard.name.split("-of-")[1].split(".")[0]) for shard in shards)  # the expert-parallel size
    expected = [f"experts_ep{rank:02d}-of-{size:02d}.safetensors" for rank in range(size)]
    if [s.name for s in shards] != expected:
        raise UserError(f"{checkpoint}: incomplete expert shards ({', '.join(s.name for s in shards)}; "
                        f"expected {', '.join(expected)})")
    parts = [load_file(str(shard)) for shard in shards]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def load_checkpoint_model(checkpoint: Path, dtype: torch.dtype | str = "auto"):
    """The model of `checkpoint`, as `from_pretrained` would load `final/` at that step (eval mode, `dtype` with
    the architecture's fp32 exceptions, training-only modules dropped). Raises `UserError` for a checkpoint whose
    weights do not match its config.json. (`minillm.runs.resolve_model_dir` refuses checkpoints saved before they
    held a config.json.)"""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    import minillm  # noqa: F401  (registers our Auto classes)

    checkpoint = Path(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    state = {k: v for k, v in checkpoint_weights(checkpoint).items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a mismatch is reported below, in one line
    try:
        model, info = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                  output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = [f"{label} {', '.join(sorted(keys)[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"]),
                                    ("mismatched", info["mismatched_keys"])) if keys]
    if problems:
        raise UserError(f"{checkpoint}: its weights do not match its config.json ({'; '.join(problems)})")
    if (checkpoint / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint)
    return model.eval()
