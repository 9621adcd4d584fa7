"""What a run trains: tokenizer, model and data for each stage, after the compatibility checks.

- pretrain: a freshly initialised `--model` from `--preset` (vocabulary sized to the tokenizer), token shards from
  `--data` or the built-in sample (built on first use into the cache), checked against the tokenizer fingerprint,
  the model's vocabulary and its maximum positions. The shards' `val` split, when present, is the validation set.
- sft: the model and tokenizer of `--model-path` (a run directory, a checkpoint of a run or a HuggingFace model
  directory; default: the latest finished pretraining run), SFT rows from `--data` or the built-in sample, padded or
  packed. The data's `val` split (`data sft --val-fraction`), when present, is the validation set.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from minillm.errors import UserError
from minillm.training.config import TrainConfig


def stack_collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Equal-length rows (pretraining windows) -> (B, L) tensors."""
    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


def sft_model_dir(model_path: str | None, model: str | None = None) -> Path:
    """The HF model directory SFT starts from: `model_path` (a model directory, a run directory's `final/` or a
    checkpoint of a run), else the `final/` of the latest finished pretraining run (of architecture `model` when
    given)."""
    from minillm import runs
    from minillm.training.checkpoint import is_checkpoint

    if model_path is None:
        finished = [r for r in runs.finished_runs("pretrain") if model is None or r.name.startswith(f"pretrain_{model}_")]
        if not finished:
            raise UserError(
                f"no finished pretraining run{' of ' + model if model else ''} under {runs.DEFAULT_RUNS_ROOT}/; run "
                "`minillm pretrain` first or pass --model-path"
            )
        return finished[-1] / "final"
    path = runs.resolve_model_dir(model_path, option="--model-path")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"--model-path {model_path}: config.json is not valid JSON") from None
    if not model_type:
        raise UserError(f"--model-path {model_path}: config.json has no model_type; not a model")
    if not is_checkpoint(path) and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"--model-path {model_path}: holds no weights (*.safetensors)")
    return path


def sft_model_type(model_dir: Path) -> str:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))["model_type"]


def build_run(config: TrainConfig):
    from minillm.training.trainer import Run

    if config.stage == "pretrain":
        return Run(**_pretrain_parts(config), model_name=config.model)
    return Run(**_sft_parts(config), model_name=config.model or "")


def _load_tokenizer(path: str | Path | None):
    from minillm.tokenizer import load_tokenizer

    return load_tokenizer(str(path) if path is not None else None)


def pretrain_model_config(config: TrainConfig, overrides: dict[str, Any] | None = None):
    """The model config a pretraining run builds: `config.model` at `config.preset` with `overrides` (default: the
    run's --model-arg). A value the config refuses is a `UserError` naming the model and preset."""
    from minillm.models.registry import build_config

    try:
        return build_config(config.model, config.preset, **(config.model_args if overrides is None else overrides))
    except (ValueError, TypeError) as err:
        raise UserError(f"model {config.model} ({config.preset}): {err}") from None


def _pretrain_parts(config: TrainConfig) -> dict[str, Any]:
    from minillm.data import pretrain as pre
    from minillm.models.registry import model_package

    tokenizer = _load_tokenizer(config.tokenizer)
    overrides = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                 "eos_token_id": tokenizer.eos_token_id, **config.model_args}
    model_config = pretrain_model_config(config, overrides)
    if config.data:
        data_dir = Path(config.data)
    else:
        from minillm.data.builtin import builtin_pretrain_shards

        data_dir = Path(builtin_pretrain_shards(config.tokenizer))
    manifest = pre.load_pretrain_manifest(data_dir)
    pre.check_shards_match(data_dir, tokenizer=tokenizer, vocab_size=model_config.vocab_size,
                           max_seq_len=config.seq_len, model_max_len=model_config.max_position_embeddings)
    train_data = pre.PretrainDataset(data_dir, config.seq_len, split="train")
    val_data = pre.PretrainDataset(data_dir, config.seq_len, split="val") if "val" in manifest["splits"] else None
    try:  # a value the config takes may still fail the model's layers (a legacy `rope_theta=abc`)
        model = model_package(config.model).MODEL_CLASS(model_config)
    except (ValueError, TypeError) as err:
        raise UserError(f"model {config.model} ({config.preset}): {err}") from None
    return dict(model=model, tokenizer=tokenizer, train_data=train_data, val_data=val_data,
                sampler=_sampler(len(train_data), config.seed), collate=stack_collate)


def _sft_parts(config: TrainConfig) -> dict[str, Any]:
    from minillm.data import sft
    from minillm.data.collate import PackedCollator, PaddedCollator
    from minillm.models.export import load_causal_lm

    model_dir = sft_model_dir(config.model_path)
    has_tokenizer = (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file()
    tokenizer = _load_tokenizer(config.tokenizer or (model_dir if has_tokenizer else None))
    if config.tokenizer and has_tokenizer:
        from minillm.tokenizer import tokenizer_fingerprint

        own = _load_tokenizer(model_dir)
        if tokenizer_fingerprint(own) != tokenizer_fingerprint(tokenizer):
            raise UserError(f"--tokenizer {config.tokenizer}: not the tokenizer {model_dir} was trained with "
                            f"({len(tokenizer)} tokens, the model's has {len(own)}); drop --tokenizer")
    model = load_causal_lm(model_dir, torch.float32, "--model-path")
    if len(tokenizer) > model.config.vocab_size:
        if config.tokenizer:
            source = f"--tokenizer {config.tokenizer}"
        elif has_tokenizer:
            source = f"--model-path {model_dir}: its tokenizer"
        else:
            source = f"--model-path {model_dir} has no tokenizer, and minillm's default"
        raise UserError(f"{source} has {len(tokenizer)} tokens, more than the model's {model.config.vocab_size}; use "
                        "the tokenizer the model was trained with (--tokenizer)")
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None and config.seq_len > max_len:
        raise UserError(f"--seq-len {config.seq_len}: longer than the model's {max_len} positions ({model_dir})")
    if config.data:
        data_dir = Path(config.data)
    else:
        from minillm.data.builtin import builtin_sft_dataset

        data_dir = Path(builtin_sft_dataset(config.tokenizer or (model_dir if has_tokenizer else None),
                                            max_seq_len=config.seq_len, pack=config.packing))
    from minillm.data.pretrain import check_shards_match

    check_shards_match(data_dir, tokenizer=tokenizer, vocab_size=model.config.vocab_size,
                       model_max_len=max_len)
    train_data = sft.SFTDataset(data_dir)
    if config.packing != bool(getattr(train_data, "packed", config.packing)):
        if config.packing:
            raise UserError(f"--data {data_dir}: not packed SFT data; rebuild it with --pack or drop --packing")
        raise UserError(f"--data {data_dir}: packed SFT data; pass --packing or rebuild it without --pack")
    built_len = train_data.manifest.get("max_seq_len")
    if built_len and built_len > config.seq_len:  # the rows would be longer than the --seq-len asked for
        raise UserError(f"--data {data_dir}: rows of up to {built_len} tokens (built with --max-seq-len {built_len}), "
                        f"longer than --seq-len {config.seq_len}; pass --seq-len {built_len} or rebuild the data")
    if built_len and built_len < config.seq_len and os.environ.get("RANK", "0") == "0":  # a warning (said once):
        # runs made so before this was noticed must still resume
        print(f"warning: seq_len {config.seq_len} is longer than the rows of --data {data_dir} (at most {built_len} "
              f"tokens, built with --max-seq-len {built_len}): the rows stay as built, while the tokens counted and "
              f"the attention FLOPs of the MFU assume {config.seq_len}; pass --seq-len {built_len}", file=sys.stderr)
    collate = PackedCollator(tokenizer.pad_token_id) if config.packing else PaddedCollator(tokenizer.pad_token_id)
    val_data = sft.SFTDataset(data_dir, split="val") if "val" in train_data.manifest["splits"] else None
    return dict(model=model, tokenizer=tokenizer, train_data=train_data, val_data=val_data,
                sampler=_sampler(len(train_data), config.seed), collate=collate, start=str(model_dir))


def _sampler(num_samples: int, seed: int):
    from minillm.data.sampler import ResumableSampler

    return ResumableSampler(num_samples, seed)
