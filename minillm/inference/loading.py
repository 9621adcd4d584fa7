"""Finding and loading a model directory for chat, serve and the benchmarks.

A model directory is what a run's `final/` holds (HF `config.json`, safetensors, tokenizer files); a run directory
or a checkpoint of a run works as well, and without `--model` the newest finished run is used (SFT before
pretrain; `minillm.runs.resolve_model_dir`). The device is
auto-detected (CUDA, then MPS, then CPU); weights run in bfloat16 on GPUs that support it, float32 elsewhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from minillm.devices import resolve_device
from minillm.errors import UserError
from minillm.runs import resolve_model_dir


def model_display_name(model_dir: Path) -> str:
    """The name a model is served under: its directory name (a run's `final/` goes by the run's name, a checkpoint
    by `<run>/step_<N>`)."""
    from minillm.training.checkpoint import is_checkpoint

    model_dir = model_dir.resolve()
    if is_checkpoint(model_dir):
        return f"{model_dir.parent.parent.name}/{model_dir.name}"
    return model_dir.parent.name if model_dir.name == "final" else model_dir.name


def default_dtype(device: torch.device) -> torch.dtype:
    """The weight dtype for decoding on `device`: bfloat16 on CUDA GPUs that support it (half the memory, fp32's
    range), float16 on MPS (its bfloat16 support is partial), float32 on CPU (where bf16 matmuls are slow)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def load_model_and_tokenizer(path: str | Path | None, device: str = "auto"):
    """Load (model, tokenizer, model_dir) ready for decoding (eval mode, on the device)."""
    from minillm.models.export import load_causal_lm
    from minillm.tokenizer import load_tokenizer

    model_dir = resolve_model_dir(path)
    dev = resolve_device(device)
    model = load_causal_lm(model_dir, default_dtype(dev))
    if (model_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(model_dir)
    else:
        tokenizer = load_tokenizer(None)
        print(f"note: {model_dir} has no tokenizer.json; using minillm's default tokenizer", file=sys.stderr)
    if len(tokenizer) > model.config.vocab_size:
        # Token ids past the embedding table would crash generation with an IndexError half-way through a reply.
        raise UserError(
            f"--model {model_dir}: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model.config.vocab_size}; put the tokenizer the model was trained with (tokenizer.json) in that directory"
        )
    return model.to(dev).eval(), tokenizer, model_dir
