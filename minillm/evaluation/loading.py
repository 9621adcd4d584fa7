"""Loading the model to evaluate, and choosing its dtype and the evaluation's window length.

Any causal LM directory works: our own architectures (registered with the Auto classes by `import minillm`) and
models exported to a native transformers architecture alike, since both load through `AutoModelForCausalLM`.
Which directory `--model` names (a run directory, a checkpoint of a run, or the newest finished run when not given)
is `minillm.runs.resolve_model_dir`'s answer; the device is `minillm.devices.resolve_device`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from minillm.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` means bfloat16 on a GPU that supports it (half the memory, same ranking of models) else float32."""
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in names:
        raise UserError(f"--dtype {dtype}: expected one of auto, {', '.join(names)}")
    return names[dtype]


def load_model_and_tokenizer(
    model_dir: Path, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `model_dir` with the Auto classes, in eval mode on `device`; errors become one-line `UserError`s."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    import minillm  # noqa: F401  (registers our architectures with the Auto classes)
    from minillm.models.export import load_causal_lm

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"--model {model_dir}: cannot load its tokenizer ({_first_line(err)})") from err
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for loading a small checkpoint is noise on stderr
    try:
        model = load_causal_lm(model_dir, dtype)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        # AutoTokenizer builds an empty tokenizer for a directory without tokenizer files: every text would then
        # score as empty
        raise UserError(f"--model {model_dir}: its tokenizer turns text into no tokens (no tokenizer files there: "
                        "tokenizer.json, or vocab.json and merges.txt)")
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"--model {model_dir}: the tokenizer has {len(tokenizer)} tokens but the model only "
                        f"{model.config.vocab_size}: not the tokenizer the model was trained with")
    model.to(device).eval()
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


DEFAULT_MAX_SEQ_LEN_CAP = 2048


def resolve_max_seq_len(model: PreTrainedModel, max_seq_len: int | None) -> int:
    """`max_seq_len`, checked against the model's position range; None means that range, capped at 2048.

    A window longer than the model was built for would silently extrapolate (or fail), so it is refused.
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    if max_seq_len is None:
        return min(limit or DEFAULT_MAX_SEQ_LEN_CAP, DEFAULT_MAX_SEQ_LEN_CAP)
    if max_seq_len < 1:
        raise UserError(f"--max-seq-len {max_seq_len}: must be at least 1")
    if limit is not None and max_seq_len > limit:
        raise UserError(f"--max-seq-len {max_seq_len} is larger than the model's maximum ({limit})")
    return max_seq_len
