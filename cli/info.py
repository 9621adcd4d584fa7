"""`minillm info`: parameter counts and training FLOPs per token of a model preset, where a run stands.

    minillm info --model mini_deepseekv3 --preset base
    minillm info --model mini_llama3 --preset base --seq-len 1024
    minillm info runs/pretrain_mini_llama3_<stamp>       # where a run stands (steps, losses, speed), its model's sizes
    minillm info runs                                    # every run there: state, steps, losses
    minillm info --model runs/pretrain_mini_llama3_<stamp>/checkpoints/step_00000200    # a trained model's sizes
    minillm info --config recipes/pretrain_llama3_base.yaml --data data/pretrain --gpu H100   # a run's budget

The numbers come from `minillm.models.stats` (the model is built on the meta device: instant, no memory); the
budget of a recipe (steps, tokens, FLOPs, expected wall time) from `minillm.training.budget`.
"""

from __future__ import annotations

import typer

# Largest --tokens a budget is computed for (a thousand times the largest public pretraining corpora): beyond it
# the durations overflow.
MAX_TOKENS = 1e15


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("info")
    def info(
        target: str = typer.Argument(None, help="The same as --model: `minillm info runs/<run>`.", show_default=False),
        model: str = typer.Option(
            None, "--model",
            help="mini_llama3 (default), mini_deepseekv3 or mini_qwen3_next; or a trained model: a model directory, "
            "run directory or checkpoint of a run, counted as it loads (without DeepSeek-V3's training-only MTP).",
        ),
        preset: str = typer.Option(None, "--preset", help="Size preset: tiny (default), small or base."),
        seq_len: int = typer.Option(
            None, "--seq-len",
            help="Sequence length for attention FLOPs (default: a trained model's training length, else the max).",
        ),
        config: str = typer.Option(
            None, "--config", help="A training recipe: print its budget (steps, tokens, FLOPs, wall time) instead."
        ),
        data: str = typer.Option(None, "--data", help="With --config: the built data to count (default: the recipe's)."),
        tokens: float = typer.Option(
            None, "--tokens", help="With --config: the dataset's size in tokens, when it is not built yet."
        ),
        gpu: str = typer.Option(
            None, "--gpu", help="With --config: the GPU for the wall time (H100 unless given; A100, 4090, ...)."
        ),
        gpus: int = typer.Option(None, "--gpus", help="With --config: number of GPUs (default 1)."),
        mfu: float = typer.Option(
            None, "--mfu", help="With --config: assumed MFU (default: the trainer's measured MFU for a base-preset "
            "model, else 0.40 dense, 0.25 MoE, our GPU goals)."
        ),
    ) -> None:
        """Parameters and FLOPs per token of a model; where a run stands (info runs/RUN); a recipe's budget."""
        from rich.console import Console
        from rich.table import Table

        from minillm.errors import UserError
        from minillm.models.stats import stats_of_config

        if target is not None:
            if model is not None:
                raise UserError(f"{target} and --model {model}: give the model once")
            model = target
        if config is not None:
            given = [flag for flag, value in (("--model", model), ("--preset", preset), ("--seq-len", seq_len))
                     if value is not None]
            if given:
                raise UserError(f"{', '.join(given)}: with --config the recipe decides the model; drop them")
            _print_budget(config, data, tokens, gpu or "H100", 1 if gpus is None else gpus, mfu)
            return
        budget_only = [flag for flag, value in (("--data", data), ("--tokens", tokens), ("--gpu", gpu),
                                                ("--gpus", gpus), ("--mfu", mfu)) if value is not None]
        if budget_only:
            raise UserError(f"{', '.join(budget_only)}: only used with --config RECIPE (a training budget)")
        from minillm.models.registry import MODEL_NAMES, build_config

        if model is not None and model not in MODEL_NAMES and _names_a_path(model):
            if preset is not None:
                raise UserError(f"--preset {preset}: {model} is a trained model, whose size is its own; drop --preset")
            from minillm.runs import run_progress

            progress = run_progress(model)
            if progress is not None:  # a run directory: where it stands, then the sizes of the model it has
                _print_progress(progress)
                if progress.model_dir is None:
                    return
                model = str(progress.model_dir)
            elif found := _runs_under(model):  # a directory of runs (runs/): one line each
                if seq_len is not None:
                    raise UserError(f"--seq-len {seq_len}: {model} holds runs, listed without their sizes; give one "
                                    "run directory for those")
                _print_runs(model, found)
                return
            model_config, title, trained_len = _trained_model_config(model)
            # runs save their models without the MTP module: "0" would read as "trained without one"
            saved_without_mtp = getattr(model_config, "num_mtp_layers", None) == 0
            mtp_row = "MTP parameters (not in saved models)" if saved_without_mtp else "MTP parameters (training only)"
            if seq_len is None:  # the length the MFU of its run was computed at
                seq_len = trained_len
        else:
            model, preset = model or "mini_llama3", preset or "tiny"
            if model not in MODEL_NAMES:  # neither an architecture nor a path that exists
                raise UserError(f"{model}: no such architecture ({', '.join(MODEL_NAMES)}) and no such directory")
            model_config, title = build_config(model, preset), f"{model} ({preset})"
            mtp_row = "MTP parameters (training only)"
        limit = model_config.max_position_embeddings
        if seq_len is not None and not 0 < seq_len <= limit:
            raise UserError(f"--seq-len {seq_len}: must be in [1, {limit}] ({title}'s positions)")
        stats = stats_of_config(model_config, seq_len=seq_len)
        table = Table(title=title)
        table.add_column("quantity")
        table.add_column("value", justify="right")
        table.add_column("millions", justify="right")
        rows = [
            ("total parameters", stats.total),
            ("embedding parameters", stats.embedding),
            ("non-embedding parameters", stats.non_embedding),
            ("activated parameters / token", stats.activated),
            ("activated non-embedding", stats.activated_non_embedding),
            (mtp_row, stats.mtp),
            (f"training FLOPs / token (seq {stats.seq_len})", stats.flops_per_token),
        ]
        for name, value in rows:
            table.add_row(name, f"{value:,}", f"{value / 1e6:,.1f}")
        Console().print(table)


def _names_a_path(model: str) -> bool:
    """Whether `--model` names a directory rather than an architecture (a path that exists or has a separator)."""
    from pathlib import Path

    return Path(model).exists() or "/" in model or "\\" in model


def _print_progress(progress) -> None:
    """The table of where a run stands (`minillm.runs.RunProgress`): state, steps, losses, speed, checkpoints."""
    from rich.console import Console
    from rich.table import Table

    from minillm.runs import resume_command
    from minillm.training.budget import format_duration

    config, run_dir = progress.config, progress.run_dir
    if config.get("stage") == "sft":
        what = f"sft of {config.get('model') or '?'} from {config.get('model_path') or '?'}"
    else:
        what = f"pretrain of {config.get('model') or '?'} ({config.get('preset') or '?'} preset)"
    resume = resume_command(config["stage"], run_dir)
    if progress.state == "finished":
        state = f"finished: its model is {run_dir / 'final'}"
    elif progress.state == "training":
        state = "training now" + (f" (pid {progress.holder_pid})" if progress.holder_pid else "")
    elif progress.checkpoints:
        state = f"stopped; continue with: {resume}"
        launch = progress.launch or {}
        if launch.get("processes", 1) != 1 or launch.get("zero_stage") is not None:
            from minillm.training.checkpoint import describe_launch

            state += (f" --launcher ACCELERATE_CONFIG (the launch it was saved by: {describe_launch(launch)}; "
                      "or under `accelerate launch`)")
    else:
        state = "stopped before its first checkpoint: nothing to resume (start it again)"
    steps = f"{progress.last_step:,}" + (f" of {progress.total_steps:,}" if progress.total_steps else "") + " logged"
    rows = [("run", what), ("state", state), ("steps", steps)]
    if progress.state != "finished" and progress.checkpoints:
        newest = progress.checkpoints[-1]
        step = progress.checkpoint_steps.get(newest)
        if step is not None:
            again = ""
            if step < progress.last_step:
                again = "; " + (f"step {progress.last_step:,} runs" if progress.last_step == step + 1 else
                                f"steps {step + 1:,} to {progress.last_step:,} run") + " again"
            rows.append(("resumes at", f"step {step:,} (its newest checkpoint{again})"))
    if (tokens := progress.latest("tokens_seen")) is not None:
        rows.append(("tokens seen", f"{tokens[1]:,.0f}"))
    if progress.records:
        rows.append(("training time", format_duration(progress.training_seconds)))
    if (loss := progress.latest("loss")) is not None:
        rows.append(("train loss", f"{loss[1]:.4f} at step {loss[0]:,} (mean since the log before)"))
    if (best := progress.best("val/loss")) is not None:
        last = progress.latest("val/loss")
        rows.append(("val loss", f"best {best[1]:.4f} at step {best[0]:,}; last {last[1]:.4f} at step {last[0]:,}"))
    speeds = sorted(r["tokens_per_s"] for r in progress.records if isinstance(r.get("tokens_per_s"), (int, float)))
    if speeds:
        mfus = sorted(r["mfu"] for r in progress.records if isinstance(r.get("mfu"), (int, float)))
        mfu = f", MFU {100 * mfus[len(mfus) // 2]:.1f}%" if mfus else ""
        rows.append(("speed (median of logs)", f"{speeds[len(speeds) // 2]:,.0f} tokens/s{mfu}"))
    memory = [r["mem_gib"] for r in progress.records if isinstance(r.get("mem_gib"), (int, float))]
    if memory:
        rows.append(("peak memory", f"{max(memory):.2f} GiB"))
    if (skipped := progress.latest("skipped_steps")) is not None and skipped[1] > 0:
        rows.append(("skipped steps", f"{skipped[1]:,.0f} (non-finite loss or no targets)"))
    if progress.checkpoints:
        rows.append(("checkpoints", ", ".join(p.name for p in progress.checkpoints)))
    table = Table(title=str(run_dir))
    table.add_column("quantity")
    table.add_column("value", overflow="fold")
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def _runs_under(directory: str) -> list:
    """Where each run directly under `directory` stands (`minillm.runs.RunProgress`), by name: stage, model, start
    time."""
    from pathlib import Path

    from minillm.runs import run_progress

    return [p for p in (run_progress(d) for d in sorted(Path(directory).glob("*")) if d.is_dir()) if p is not None]


def _print_runs(directory: str, found: list) -> None:
    """One row per run of `found` (`_runs_under(directory)`)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"runs in {directory}")
    for column in ("run", "state", "steps", "train loss", "best val loss"):
        table.add_column(column, justify="left" if column in ("run", "state") else "right", overflow="fold")
    for progress in found:
        loss, best = progress.latest("loss"), progress.best("val/loss")
        table.add_row(progress.run_dir.name, progress.state,
                      f"{progress.last_step:,}" + (f"/{progress.total_steps:,}" if progress.total_steps else ""),
                      f"{loss[1]:.4f}" if loss else "-", f"{best[1]:.4f} (step {best[0]:,})" if best else "-")
    Console().print(table)


def _trained_model_config(path: str):
    """(config, table title, the length its run trained at or None) of the minillm model at `path` (model
    directory, run directory or checkpoint)."""
    from transformers import AutoConfig

    from minillm.errors import UserError
    from minillm.models.registry import MODEL_NAMES
    from minillm.runs import resolve_model_dir, trained_seq_len

    model_dir = resolve_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {path}: cannot read its config.json ({str(err).splitlines()[0]})") from None
    if config.model_type not in MODEL_NAMES:
        raise UserError(f"--model {path}: a {config.model_type!r} model; info counts minillm models "
                        f"({', '.join(MODEL_NAMES)}); `minillm export --to minillm` converts the references")
    return config, f"{config.model_type} ({model_dir})", trained_seq_len(model_dir)


def _print_budget(recipe: str, data: str | None, tokens: float | None, gpu: str, gpus: int, mfu: float | None) -> None:
    """The budget table of a recipe (see `minillm.training.budget`)."""
    from rich.console import Console
    from rich.table import Table

    from minillm.errors import UserError
    from minillm.training import budget
    from minillm.training.config import build_config, load_recipe
    from minillm.training.perf import GPU_PEAK_TFLOPS, gpu_peak_flops

    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be at least 1")
    if mfu is not None and not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu}: must be in (0, 1]")
    if tokens is not None and not 1 <= tokens <= MAX_TOKENS:  # also refuses nan
        raise UserError(f"--tokens {tokens:g}: must be a number of tokens from 1 to {MAX_TOKENS:.0e}")
    stage = load_recipe(recipe).get("stage", "pretrain")
    cfg = build_config(stage, recipe, {"data": data} if data else {}).resolve()
    precision = "bf16" if cfg.precision in ("auto", "bf16") else cfg.precision
    peak = gpu_peak_flops(gpu, precision)
    if peak is None:
        raise UserError(f"--gpu {gpu!r}: no {precision} peak known (known: {', '.join(GPU_PEAK_TFLOPS)})")
    stats, model_label, model_type = _recipe_model_stats(cfg)
    if mfu is not None:
        mfu_source = "given"
    else:
        mfu, mfu_source = budget.default_mfu(model_type, moe=stats.activated < stats.total,
                                             base_preset=_is_base_preset(model_type, stats, cfg.seq_len),
                                             compiled=cfg.compile)
    num_rows = None
    if not cfg.max_steps and tokens is None:
        if not cfg.data:
            raise UserError("the recipe uses the built-in sample: run it, or give --data DIR or --tokens N")
        num_rows = budget.count_rows(cfg, cfg.data)
    run = budget.plan(cfg, stats.flops_per_token, num_rows=num_rows, tokens=int(tokens) if tokens else None)
    table = Table(title=f"budget of {recipe}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    if num_rows is not None:
        rows_source = f"{num_rows:,} rows in {cfg.data}"
    elif tokens is not None:
        rows_source = f"{int(tokens):,} tokens (as given by --tokens)"
    else:
        rows_source = "max_steps (data size not needed)"
    for name, value in [
        ("model", model_label),
        ("parameters (activated / token)", f"{stats.total / 1e6:,.1f}M ({stats.activated / 1e6:,.1f}M)"),
        ("data", rows_source),
        ("steps", f"{run.steps:,}" + (f" ({cfg.epochs:g} epoch{'' if cfg.epochs == 1 else 's'})" if not cfg.max_steps else "")),
        ("tokens per step", f"{run.tokens_per_step:,} ({cfg.global_batch_size} rows x {cfg.seq_len})"),
        ("token budget", f"{run.tokens:,} ({run.tokens / 1e9:,.2f}B)"),
        ("learning rate", f"{cfg.lr:g} -> {cfg.min_lr:g}"),
        ("training FLOPs", f"{run.flops:.3g} ({stats.flops_per_token / 1e6:,.0f}M / token)"),
        ("GPU", f"{gpus} x {gpu}, {peak / 1e12:,.0f} TFLOP/s {precision} dense peak"),
        ("assumed MFU", f"{mfu:.1%} ({mfu_source})"),
        ("expected wall time", budget.format_duration(run.seconds(peak, mfu, gpus))),
    ]:
        table.add_row(name, value)
    Console().print(table)


def _is_base_preset(model_type: str | None, stats, seq_len: int) -> bool:
    """Whether a model of `model_type` with these `stats` is our `base` preset (with or without DeepSeek-V3's MTP
    block, which SFT drops): the size the measured MFU belongs to."""
    from minillm.models.registry import MODEL_NAMES
    from minillm.models.stats import config_stats

    if model_type not in MODEL_NAMES:
        return False
    sizes = {config_stats(model_type, "base", seq_len=seq_len, **overrides).total
             for overrides in ({}, _without_mtp(model_type))}
    return stats.total in sizes


def _without_mtp(model_type: str) -> dict:
    """The config override that drops DeepSeek-V3's training-only MTP block ({} for architectures without one), as
    a pretraining run's final/ is saved and SFT starts from it."""
    from minillm.models.registry import config_fields, model_package

    return {"num_mtp_layers": 0} if "num_mtp_layers" in config_fields(model_package(model_type).CONFIG_CLASS) else {}


def _recipe_model_stats(cfg):
    """(stats, label, model type) of the model a resolved config trains: its preset, or for SFT the model it starts
    from (the base preset of its architecture when that run does not exist yet)."""
    from transformers import AutoConfig

    import minillm  # noqa: F401  (registers our architectures)
    from minillm.errors import UserError
    from minillm.models.stats import config_stats, model_stats, stats_of_config

    if cfg.stage == "pretrain":
        from minillm.training.setup import pretrain_model_config

        return stats_of_config(pretrain_model_config(cfg), cfg.seq_len), f"{cfg.model} ({cfg.preset})", cfg.model
    try:
        from minillm.training.setup import sft_model_dir

        model_dir = sft_model_dir(cfg.model_path, cfg.model)
    except UserError:
        if not cfg.model:
            raise
        # SFT starts from a pretraining run's final/, saved without DeepSeek-V3's training-only MTP block
        return (config_stats(cfg.model, "base", seq_len=cfg.seq_len, **_without_mtp(cfg.model)),
                f"{cfg.model} (base preset: not pretrained yet)", cfg.model)
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return model_stats(model, cfg.seq_len), f"{model.config.model_type} from {model_dir}", model.config.model_type
