"""`TrainConfig`: every option of a pretraining or SFT run, in one dataclass.

Where the values come from, lowest priority first:
1. the defaults of the stage and preset (`STAGE_DEFAULTS`, `PRESET_DEFAULTS`): `minillm pretrain --model X` alone is
   the CPU quick start; `--preset base` switches to the seed's real-run settings;
2. a YAML recipe (`--config recipes/x.yaml`): a flat mapping of field names; an unknown key is an error that names
   the key and suggests the closest field;
3. command-line flags (`--lr 1e-3`), generated from the fields below, so the CLI, the recipes and the resolved
   `config.yaml` written into every run directory all use the same names.

Fields left `None` mean "use the stage/preset default"; `resolve()` fills them and checks the values.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minillm.errors import UserError

STAGES = ("pretrain", "sft")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")  # torch.compile's


def _opt(help: str, stages: tuple[str, ...] = STAGES, default: Any = None, **kwargs: Any) -> Any:
    """A dataclass field with its CLI help text and the stages whose command exposes it."""
    if "default_factory" in kwargs:
        return field(metadata={"help": help, "stages": stages}, **kwargs)
    return field(default=default, metadata={"help": help, "stages": stages}, **kwargs)


@dataclass
class TrainConfig:
    """All options of one run (see the module docstring for where values come from)."""

    stage: str = _opt("pretrain or sft (set by the command)", stages=(), default="pretrain")
    # model
    model: str | None = _opt("architecture (required, here or in --config): mini_llama3, mini_deepseekv3 or "
                             "mini_qwen3_next; in an SFT recipe, whose newest pretraining run to start from",
                             stages=("pretrain",))
    preset: str = _opt(
        "model size preset: tiny (CPU quick start), small (13-22M, CPU runs on real text) or base (100-200M)",
        ("pretrain",),
        "tiny",
    )
    model_args: dict[str, Any] = _opt(
        "model config overrides, e.g. num_hidden_layers=2 (repeatable; YAML values, null for None)",
        ("pretrain",), default_factory=dict
    )
    model_path: str | None = _opt(
        "pretrained run directory, checkpoint of a run or HF model directory to start from (default: the latest "
        "pretrain run)", ("sft",)
    )
    tokenizer: str | None = _opt("tokenizer directory (default: the shipped one, or the model's for SFT)")
    # data
    data: str | None = _opt("token shard directory (pretrain) or SFT data directory (default: built-in sample)")
    packing: bool = _opt("pack several conversations per row (document-masked attention)", ("sft",), False)
    seq_len: int | None = _opt("tokens per training row (sft with --data: by default the length the data was built for)")
    # batch
    micro_batch_size: int | None = _opt("rows per forward pass on each process")
    global_batch_size: int | None = _opt(
        "rows per optimizer step over all processes (= micro batch x accumulation x processes)"
    )
    max_steps: int | None = _opt("optimizer steps (default: `epochs` passes over the data)")
    epochs: float | None = _opt("passes over the data when max_steps is not set")
    # optimisation (defaults from the seed: AdamW(0.9, 0.95), wd 0.01, 5% warmup, cosine to min_lr at 98%)
    lr: float | None = _opt("peak learning rate")
    min_lr: float | None = _opt("learning-rate floor of the cosine decay")
    warmup_ratio: float = _opt("fraction of the steps spent warming up linearly (at least 1 step unless 0)", default=0.05)
    warmup_steps: int | None = _opt("warmup steps (overrides warmup_ratio)")
    decay_ratio: float = _opt("fraction of the steps at which the cosine reaches min_lr", default=0.98)
    weight_decay: float = _opt("AdamW weight decay (never on norms, biases, embeddings)", default=0.01)
    adam_beta1: float = _opt("AdamW beta1", default=0.9)
    adam_beta2: float = _opt("AdamW beta2", default=0.95)
    adam_eps: float = _opt("AdamW epsilon", default=1e-8)
    max_grad_norm: float = _opt("gradient clipping norm (0 disables clipping)", default=1.0)
    precision: str = _opt("auto (bf16 on a GPU or CPU that multiplies in bf16, else fp32), fp32, bf16 or fp16 (GPU)", default="auto")
    seed: int = _opt("random seed (weights, data order)", default=42)
    gradient_checkpointing: bool = _opt("recompute activations in backward to save memory", default=False)
    compile: bool = _opt("torch.compile each decoder layer (faster steps after a slower first one)", default=False)
    compile_mode: str = _opt(
        "torch.compile mode with --compile: default, reduce-overhead (CUDA graphs: less host time per step), "
        "max-autotune-no-cudagraphs or max-autotune", default="default"
    )
    expert_parallel_size: int = _opt(
        "shard the routed experts of a MoE model over this many processes (DeepSpeed ZeRO-1/2; 1 = off)", default=1
    )
    # run directory, checkpoints, logs
    output_dir: str | None = _opt("run directory (default: runs/<stage>_<model>_<time>)")
    overwrite: bool = _opt(
        "start a new run in an output directory that holds one (the old run is moved to <dir>.previous-<time>)",
        default=False)
    resume: str | None = _opt("continue a run: `latest` or a checkpoint/run directory")
    save_every: int | None = _opt("save a checkpoint every N steps (0: only the final model)")
    keep_last: int = _opt("checkpoints to keep (older ones of this run are deleted)", default=3)
    log_every: int | None = _opt(
        "log metrics (and show the loss: the mean of the steps since the last log) every N steps; only then is the "
        "loss read from the device"
    )
    eval_every: int | None = _opt("validation loss every N steps on the data's val split (0: off)")
    eval_batches: int = _opt(
        "global batches per validation pass: N x global_batch_size rows spread evenly over the val split, whatever "
        "the processes and micro-batches", default=8)
    max_bad_steps: int = _opt("stop after this many non-finite losses in a row", default=5)
    peak_tflops: float | None = _opt("peak TFLOP/s of one device for the MFU estimate (default: a table of known "
                                     "GPUs; on a CPU, measured)")

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def resolve(self) -> TrainConfig:
        """A copy with every `None` default filled from the stage/preset tables, after checking the values."""
        if self.stage not in STAGES:
            raise UserError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.stage == "pretrain" and not self.model:
            raise UserError("pretrain needs --model (mini_llama3, mini_deepseekv3 or mini_qwen3_next)")
        defaults = dict(STAGE_DEFAULTS[self.stage])
        if self.stage == "pretrain":
            defaults.update(PRESET_DEFAULTS.get(self.preset, {}))
        elif self.data and (built := _built_seq_len(self.data)):  # SFT rows as long as `data sft` built them
            defaults["seq_len"] = built
        filled = {k: (defaults[k] if getattr(self, k) is None and k in defaults else getattr(self, k))
                  for k in self.field_names()}
        cfg = TrainConfig(**filled)
        cfg._check()
        return cfg

    def _check(self) -> None:
        positive = ("seq_len", "micro_batch_size", "global_batch_size", "keep_last", "log_every", "eval_batches",
                    "max_bad_steps")
        for name in positive:
            if getattr(self, name) is None or getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be > 0, got {self.epochs}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise UserError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if not (0 <= self.warmup_ratio < 1 and 0 < self.decay_ratio <= 1):
            raise UserError("--warmup-ratio must be in [0, 1) and --decay-ratio in (0, 1]")
        if self.overwrite and self.resume:
            raise UserError("--overwrite starts the run again and --resume continues it: give one of them")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise UserError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile_mode != "default" and not self.compile:
            raise UserError(f"--compile-mode {self.compile_mode} does nothing without --compile")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        for name in ("adam_eps", "peak_tflops"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise UserError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # numpy's seeding (data order) takes 32-bit seeds
            raise UserError(f"--seed must be in [0, 2^32), got {self.seed}")
        if self.global_batch_size % self.micro_batch_size:
            raise UserError(
                f"global batch size {self.global_batch_size} is not divisible by the micro batch size "
                f"{self.micro_batch_size}"
            )


def _flag(name: str) -> str:
    return name.replace("_", "-")


# Stage defaults (the quick start: CPU-sized) and preset defaults (pretrain only) for fields left None.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": dict(seq_len=256, micro_batch_size=8, global_batch_size=8, epochs=1.0, lr=3e-3, min_lr=1e-4,
                     save_every=0, log_every=5, eval_every=0),
    # the seed's SFT is lr 3e-5 -> 1e-6 for 3 epochs (recipes/sft_*_base.yaml); the quick start makes four passes
    # with a much larger step: that is what it takes (about a CPU minute) for a tiny model, fresh from the quick
    # pretraining, to answer "who are you" correctly in English and Chinese
    "sft": dict(seq_len=256, micro_batch_size=8, global_batch_size=8, epochs=4.0, lr=3e-3, min_lr=1e-4,
                save_every=0, log_every=5, eval_every=0),
}
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # the CPU size for real text: 16 rows of 256 tokens per step (0.7 s in bf16 on two cores for mini_llama3); use
    # --max-steps, since one epoch of real data is hours on a CPU
    "small": dict(micro_batch_size=16, global_batch_size=16, lr=2e-3, min_lr=1e-4, save_every=500, log_every=10,
                  eval_every=200),
    # the seed's base pretraining: seq 512, 16 rows per GPU, lr 3e-4 -> 1e-5, one epoch
    "base": dict(seq_len=512, micro_batch_size=16, global_batch_size=64, lr=3e-4, min_lr=1e-5, save_every=1000,
                 log_every=10, eval_every=1000),
}


# ---------------------------------------------------------------------------------------------------------------
# Recipes and overrides


# Names other trainers give our fields (transformers' TrainingArguments, nanochat, the seed): the hint names ours.
# Spelling alone would mislead here (`learning_rate` is closest to `decay_ratio`).
KNOWN_SYNONYMS: dict[str, str] = {
    "learning_rate": "lr",
    "max_lr": "lr",
    "min_learning_rate": "min_lr",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "micro_batch_size",
    "device_batch_size": "micro_batch_size",
    "total_batch_size": "global_batch_size",
    "gradient_accumulation_steps": "global_batch_size",
    "max_seq_length": "seq_len",
    "max_seq_len": "seq_len",
    "max_length": "seq_len",
    "sequence_length": "seq_len",
    "block_size": "seq_len",
    "grad_clip": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm",
    "save_steps": "save_every",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "save_total_limit": "keep_last",
    "bf16": "precision",
    "fp16": "precision",
    "dtype": "precision",
    "mixed_precision": "precision",
    "torch_compile": "compile",
    "resume_from_checkpoint": "resume",
    "dataset": "data",
    "data_path": "data",
    "model_name_or_path": "model_path",
    "model_name": "model",
    "model_type": "model",
    "arch": "model",
}


def closest_field(name: str) -> str:
    """A ' (did you mean X?)' hint for an unknown option name, or '' when nothing is close: another trainer's name
    for one of our fields (`KNOWN_SYNONYMS`), else the nearest spelling."""
    fields = TrainConfig.field_names()
    match = difflib.get_close_matches(name.replace("-", "_").lower(), [*fields, *KNOWN_SYNONYMS], n=1, cutoff=0.6)
    return f" (did you mean {KNOWN_SYNONYMS.get(match[0], match[0])!r}?)" if match else ""


def yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong in a YAML text and where, in one line ("found ... (line 3, column 7)")."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The options of a YAML recipe, checked against the fields of `TrainConfig`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe {path} is a directory; give a YAML file (shipped recipes: "
                        f"{', '.join(shipped_recipes())})")
    if not path.is_file():
        # a shipped recipe by its name (`x.yaml`, `x`) or its place in the repository (`recipes/x.yaml`), from any
        # directory; another folder is the user's own file, mistyped: not to be replaced by a shipped namesake
        found = find_recipe(str(path)) if str(path.parent) in (".", "recipes") else None
        if found is None:
            raise UserError(f"recipe {path} does not exist (shipped recipes: {', '.join(shipped_recipes())})")
        path = found
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"recipe {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of option names to values")
    known = set(TrainConfig.field_names())
    for key in data:
        if key not in known:
            raise UserError(f"recipe {path}: unknown key {key!r}{closest_field(str(key))}")
    return {key: coerce(key, value, source=f"recipe {path}") for key, value in data.items()}


def _built_seq_len(data: str) -> int | None:
    """The `max_seq_len` an SFT data directory was built for (its manifest), or None when there is none to read:
    the data checks of the run say what is wrong with the directory."""
    try:
        value = json.loads((Path(data) / "manifest.json").read_text(encoding="utf-8")).get("max_seq_len")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _check_stage_keys(values: dict[str, Any], stage: str, recipe: str | None) -> None:
    """Refuse a recipe key that this stage does not use (`packing` in pretraining, `preset` in SFT), unless it
    holds the default, as a run's saved config.yaml records every field. `model` is exempt: SFT uses it to pick
    the latest pretraining run of that architecture, and checks it against `model_path` (`train`)."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("stage", "model") or f.name not in values or stage in f.metadata["stages"]:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if values[f.name] != default:
            used_by = " and ".join(f.metadata["stages"])
            raise UserError(f"recipe {recipe}: {f.name} is a {used_by} option; {stage} runs do not use it")


def coerce(name: str, value: Any, source: str = "option") -> Any:
    """`value` converted to the type of field `name` (YAML reads `1e-3` as a string; the CLI gives strings)."""
    annotation = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}[name]
    if value is None:
        if "None" in annotation:
            return None
        raise UserError(f"{source}: {name} cannot be empty")
    try:
        if annotation.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError("expected a mapping")
            return dict(value)
        if annotation.startswith("bool"):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if annotation.startswith(("int", "float")):
            if isinstance(value, bool) or not math.isfinite(float(value)):  # YAML's .inf / .nan, `--lr inf`
                raise ValueError("expected a finite number")
            if annotation.startswith("int"):
                if float(value) != int(float(value)):
                    raise ValueError("expected an integer")
                return int(float(value))
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError) as err:
        if source == "option":  # a command-line flag: named as the user typed it
            shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:20]}..."
            raise UserError(f"--{name.replace('_', '-')} {shown}: invalid ({err})") from None
        raise UserError(f"{source}: {name}={value!r} is invalid ({err})") from None


def recipes_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes"


def shipped_recipes() -> list[str]:
    return sorted(p.name for p in recipes_dir().glob("*.yaml"))


def find_recipe(name: str) -> Path | None:
    """A shipped recipe by file name (`recipes/x.yaml`, `x.yaml` or `x`), so recipes work from any directory."""
    stem = Path(name).name
    for candidate in (stem, f"{stem}.yaml"):
        path = recipes_dir() / candidate
        if path.is_file():
            return path
    return None


def build_config(stage: str, recipe: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- recipe <- overrides (CLI flags given by the user), unresolved (see `TrainConfig.resolve`)."""
    values: dict[str, Any] = {}
    if recipe:
        values.update(load_recipe(recipe))
    if values.get("stage", stage) != stage:
        raise UserError(f"recipe {recipe} is for stage {values['stage']!r}, not {stage!r}")
    _check_stage_keys(values, stage, recipe)
    # --resume and --overwrite are the two launch actions: the one given on the command line replaces the other in
    # the recipe (a run's config.yaml written before they were left out of it records `overwrite: true`)
    for given, other in (("resume", "overwrite"), ("overwrite", "resume")):
        if (overrides or {}).get(given):
            values.pop(other, None)
    for key, value in (overrides or {}).items():
        if key not in TrainConfig.field_names():
            raise UserError(f"unknown option {key!r}{closest_field(key)}")
        value = coerce(key, value)
        if key == "model_args":
            values["model_args"] = {**values.get("model_args", {}), **value}
        else:
            values[key] = value
    values["stage"] = stage
    return TrainConfig(**values)


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")  # 1e4, 5e-5, 2.5E+3 (not nan, inf)


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """`["num_hidden_layers=2", "rope_theta=1e4"]` -> {"num_hidden_layers": 2, "rope_theta": 10000.0}. Values are
    YAML, and unquoted numbers in exponent notation are numbers (YAML 1.1 reads `1e4` as a string); Python's
    `None`, as the config docstrings spell it, is read as YAML's null; nan and infinities are refused."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--model-arg expects KEY=VALUE, got {item!r}")
        if raw.strip() == "None":
            out[key.strip()] = None
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "not a YAML value"
            raise UserError(f"--model-arg {item}: the value is not valid YAML ({problem})") from None
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(raw.strip()):
            value = float(raw)  # YAML 1.1 reads 1e4 and 5e-5 as strings
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--model-arg {item}: must be a finite number")
        out[key.strip()] = value
    return out


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (temporary file + rename). `overwrite` and `resume` say what one launch
    did, not how the run trains: they are recorded as their defaults, so `--config RUN/config.yaml` neither
    resumes nor replaces anything unless asked (`--config RUN/config.yaml --resume RUN`)."""
    record = {**config.to_dict(), "overwrite": False, "resume": None}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def read_saved_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


# Fields that define what is trained on what, and how far along which schedule: a resumed run must not change
# them (a resume without the original flags would otherwise fall back to defaults: another length, another LR
# curve), nor how the experts are split over processes (expert_parallel_size). Logging, saving and evaluation
# intervals may change, and so may the micro-batch size: a step is the same global batch however it is split
# (batches.GlobalBatches), so a run can resume on a device with less memory.
IDENTITY_FIELDS = ("stage", "model", "preset", "model_args", "data", "packing", "seq_len", "global_batch_size",
                   "seed", "tokenizer", "max_steps", "epochs", "lr", "min_lr", "warmup_ratio", "warmup_steps",
                   "decay_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm", "precision",
                   "expert_parallel_size")
