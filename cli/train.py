"""`minillm pretrain` and `minillm sft`: one trainer, two stages.

    minillm pretrain --model mini_deepseekv3                          # CPU quick start: tiny preset, built-in data
    minillm pretrain --model mini_llama3 --preset base --data data/pretrain
    minillm pretrain --config recipes/pretrain_llama3_base.yaml --lr 6e-4
    minillm sft --packing                                             # from the latest pretraining run
    minillm pretrain --launcher accelerate_configs/ddp.yaml --config recipes/pretrain_llama3_base.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml cli/main.py pretrain --config ...

The options are generated from `minillm.training.config.TrainConfig`, so every recipe key is also a flag
(`seq_len` <-> `--seq-len`) and flags override the recipe.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import typer

_TYPES: dict[str, Any] = {"int": int | None, "float": float | None, "str": str | None, "bool": bool | None}


_METAVARS: dict[Any, str] = {int | None: "INTEGER", float | None: "FLOAT", str | None: "TEXT"}


def _field_type(annotation: str) -> Any:
    return _TYPES[annotation.split("|")[0].strip()]


def _default_note(stage: str, field: dataclasses.Field) -> str:
    """` [default: X]` for `--help`: the dataclass default, else the stage's (`STAGE_DEFAULTS`), with the presets
    that change it (`small: 16, base: 32`) for pretraining; "" when there is none (a value derived at run time)."""
    from minillm.training.config import PRESET_DEFAULTS, STAGE_DEFAULTS

    value = field.default if field.default not in (None, dataclasses.MISSING) else STAGE_DEFAULTS[stage].get(
        field.name)
    if value is None:
        return ""
    presets = [f"{name}: {values[field.name]}" for name, values in PRESET_DEFAULTS.items()
               if stage == "pretrain" and field.name in values and values[field.name] != value]
    return f" \\[default: {value}{'; ' + ', '.join(presets) if presets else ''}]"


def _stage_command(stage: str, doc: str):
    """A Typer command for `stage` whose options are the `TrainConfig` fields exposed for that stage."""
    from minillm.training.config import TrainConfig

    fields = [f for f in dataclasses.fields(TrainConfig) if stage in f.metadata.get("stages", ())]
    params = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                          default=typer.Option(None, "--config", help="YAML recipe; flags override its values.")),
        inspect.Parameter("launcher", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                          default=typer.Option(None, "--launcher",
                                               help="accelerate config file: re-run under `accelerate launch`.")),
    ]
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        if f.name == "model_args":
            params.append(inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, annotation=list[str] | None,
                default=typer.Option(None, "--model-arg", help=f.metadata["help"])))
            continue
        kind = _field_type(str(f.type))
        decls = [f"{flag}/--no-{flag[2:]}"] if kind == (bool | None) else [flag]
        default_note = "" if kind == (bool | None) else _default_note(stage, f)
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
            default=typer.Option(None, *decls, help=f.metadata["help"] + default_note, show_default=False,
                                 metavar=_METAVARS.get(kind))))

    def command(**kwargs: Any) -> None:
        _run(stage, kwargs.pop("config"), kwargs.pop("launcher"), kwargs)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    command.__name__ = stage
    return command


def _run(stage: str, recipe: str | None, launcher: str | None, values: dict[str, Any]) -> None:
    from minillm.training.config import build_config, parse_model_args

    overrides = {k: v for k, v in values.items() if v is not None and k != "model_args"}
    if values.get("model_args"):
        overrides["model_args"] = parse_model_args(values["model_args"])
    config = build_config(stage, recipe, overrides)
    if launcher:
        from minillm.training import launch

        resolved = config.resolve()  # one clear error here rather than after starting the ranks
        if resolved.stage == "pretrain":
            from minillm.training.setup import pretrain_model_config

            pretrain_model_config(resolved)  # --model-arg values the model config refuses
        launcher_cfg, _ = launch.read_launcher(launcher)
        launch.check_world(launcher_cfg, resolved.micro_batch_size, resolved.global_batch_size)
        launch.check_deepspeed_file(launcher_cfg, resolved)
        from minillm.training.trainer import check_expert_parallel

        check_expert_parallel(resolved, launch.launch_facts(launcher_cfg))
        raise typer.Exit(launch.relaunch(launcher, _argv(stage, recipe, overrides)))
    from minillm.training.trainer import train

    train(config)


def _argv(stage: str, recipe: str | None, overrides: dict[str, Any]) -> list[str]:
    """The command line that reproduces `stage` with `recipe` and `overrides` (for the relaunch)."""
    import yaml

    argv = [stage] + (["--config", recipe] if recipe else [])
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if key == "model_args":
            for k, v in value.items():
                argv += ["--model-arg", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"]
        elif isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            argv += [flag, str(value)]
    return argv


def register(app: typer.Typer) -> None:
    """Add `pretrain` and `sft` to the app."""
    app.command("pretrain")(_stage_command(
        "pretrain",
        "Pretrain a model from scratch on token shards (default: tiny preset on the built-in sample, a few "
        "minutes on a CPU). Leaves runs/pretrain_<model>_<time>/ with final/, logs/, metrics.jsonl, "
        "loss_curve.png.",
    ))
    app.command("sft")(_stage_command(
        "sft",
        "Supervised fine-tuning of a pretrained model on chat data (default: the latest pretraining run and the "
        "built-in sample). --packing packs several conversations per row.",
    ))
