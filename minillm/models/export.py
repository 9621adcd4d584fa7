"""Export a minillm model to the native transformers architecture, and import one back.

    minillm export --to hf runs/sft_mini_llama3_.../final exported/          # LlamaForCausalLM checkpoint
    minillm export --to minillm exported/ back/                                # and back

The exported directory is an ordinary transformers checkpoint of the reference class (`LlamaForCausalLM`,
`DeepseekV3ForCausalLM`, `Qwen3NextForCausalLM`): safetensors weights, `config.json`, `generation_config.json` and
the tokenizer files. It loads with `AutoModelForCausalLM.from_pretrained` without minillm installed, which is what
vLLM, SGLang and llama.cpp's converters need. Training-only parts (DeepSeek-V3's MTP module) are dropped by the
architecture's `to_reference`.

The output is written to a temporary sibling directory and renamed into place only when complete, so a failed
export never leaves a half-written model; an existing non-empty destination is refused, never overwritten.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from minillm.errors import UserError
from minillm.paths import apply_umask, check_creatable, check_not_working_directory, make_parent_dirs
from minillm.runs import TRAINED_SEQ_LEN_KEY, resolve_model_dir, trained_seq_len

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# model_type of the transformers reference config -> our architecture name.
REFERENCE_MODEL_TYPES = {
    "llama": "mini_llama3",
    "deepseek_v3": "mini_deepseekv3",
    "qwen3_next": "mini_qwen3_next",
}

# Tokenizer files copied along with the weights (whichever exist).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def copy_weights(src, dst, skip: tuple[str, ...] = ()) -> None:
    """Copy the tensors of `src` into `dst` (one of our models and its reference class: same parameter names by
    construction), raising `ValueError` on any name that does not match.

    `skip`: name prefixes that exist on one side only (DeepSeek-V3's training-only `mtp.`): not copied, and a
    freshly built module under them keeps its own initialisation. With tied embeddings the head is an alias of the
    embedding and may be absent from one side's state dict.
    """
    state = {k: v for k, v in src.state_dict().items() if not k.startswith(skip)}
    _match_dtypes(dst, state)
    missing, unexpected = dst.load_state_dict(state, strict=False)
    tied = dst.config.tie_word_embeddings
    # A part with no elements may exist on one side only: DeepSeek-V3's reference builds zero-width shared experts
    # when there are none (n_shared_experts=0), ours builds no module. Nothing is lost by not copying it.
    empty = {k for k, v in dst.state_dict().items() if v.numel() == 0}
    missing = [k for k in missing if not (k == "lm_head.weight" and tied) and not k.startswith(skip) and k not in empty]
    unexpected = [k for k in unexpected if state[k].numel() > 0]
    if missing or unexpected:
        raise ValueError(f"state dicts do not match: missing {missing}, unexpected {unexpected}")


def _match_dtypes(dst, state: dict) -> None:
    """Give each parameter and buffer of `dst` the dtype of the tensor `state` holds for it, before the copy: a
    bf16 model keeps some tensors in fp32 (DeepSeek-V3's router weight and balancing bias, whose ~1e-3 updates bf16
    would round away), and copying them into a bf16 tensor would round them."""
    for name, tensor in [*dst.named_parameters(), *dst.named_buffers()]:
        source = state.get(name)
        if source is not None and source.dtype != tensor.dtype:
            tensor.data = tensor.data.to(source.dtype)


def convert_model(src, dst_class, dst_config, skip: tuple[str, ...] = ()):
    """A `dst_class` built from `dst_config` holding `src`'s weights, on its dtype and device and in its train/eval
    mode: the one body of every architecture's `to_reference` / `from_reference`."""
    dst = dst_class(dst_config).to(dtype=src.dtype, device=src.device)
    copy_weights(src, dst, skip=skip)
    return dst.train(src.training)


# Key of the exported config.json holding the fields of our config that the reference config has no place for
# (training knobs such as DeepSeek-V3's `bias_update_speed`, speed knobs such as `loss_chunk_size`). transformers
# keeps unknown config keys as plain attributes and ignores them, so the export still loads anywhere, and
# `--to minillm` restores them instead of resetting them to our defaults. The same section records the length the
# model trained at (`runs.TRAINED_SEQ_LEN_KEY`).
OWN_FIELDS_KEY = TRAINED_SEQ_LEN_KEY[0]


def own_fields(config: PretrainedConfig, names: tuple[str, ...]) -> dict:
    """`{OWN_FIELDS_KEY: {name: value}}` for the reference config's constructor: `names` of our `config`."""
    return {OWN_FIELDS_KEY: {name: getattr(config, name) for name in names}}


def restored_own_fields(ref_config: PretrainedConfig, names: tuple[str, ...]) -> dict:
    """The fields `own_fields` stored in a reference config (only those in `names`; none for a checkpoint that
    did not come from minillm). Our config class checks their values."""
    stored = getattr(ref_config, OWN_FIELDS_KEY, None)
    if stored is None:
        return {}
    if not isinstance(stored, dict):
        raise ValueError(f"config.json's {OWN_FIELDS_KEY!r} must be an object of minillm config fields")
    return {name: value for name, value in stored.items() if name in names}


def _check_destination(dst: Path, src: Path) -> None:
    if src.resolve() in dst.resolve().parents or dst.resolve() == src.resolve():
        raise UserError(f"{dst}: inside the model being converted ({src}); choose a destination outside it")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: a file; the destination is a new directory")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst}: already exists and is not an empty directory; choose a new destination")
    check_not_working_directory(dst, "destination")
    check_creatable(dst, "destination")


def _copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _write_atomically(dst: Path, write) -> None:
    """Run `write(tmp_dir)` in a temporary sibling of `dst`, then rename it to `dst`."""
    make_parent_dirs(dst, "destination")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        write(tmp)
        apply_umask(tmp)
        if dst.exists():
            dst.rmdir()  # empty (checked before)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_causal_lm(model_dir: str | Path, dtype, option: str | None = "--model"):
    """`AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)` (our architectures registered), or the model
    of a training checkpoint (`minillm.training.checkpoint.load_checkpoint_model`), with any failure as a one-line
    `UserError` naming `option` (None: a positional argument, the path alone): a truncated safetensors file,
    weights that do not match config.json and a bad config are all user data (chat, serve, eval, sft, export)."""
    from transformers import AutoModelForCausalLM

    import minillm  # noqa: F401  (registers our Auto classes)
    from minillm.training import checkpoint

    where = f"{option} {model_dir}" if option else str(model_dir)
    try:
        if checkpoint.is_checkpoint(Path(model_dir)):
            return checkpoint.load_checkpoint_model(Path(model_dir), dtype)
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    except UserError as err:  # it names the checkpoint; say which option it came from
        if option:
            raise UserError(f"{option} {err}") from None
        raise
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{where}: cannot load the model: {load_error_reason(err)}") from None


def load_error_reason(err: BaseException) -> str:
    """One line saying why `from_pretrained` failed, for a `UserError` (export, chat, serve).

    transformers' errors are often multi-line (or point at a report it logged), so keep the first line, and name
    the usual cause of a size mismatch: a config.json that does not describe the saved weights.
    """
    text = str(err)
    if "ignore_mismatched_sizes" in text:
        return "the weights' shapes do not match config.json"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def export_to_hf(src_dir: str | Path, dst_dir: str | Path) -> dict:
    """Convert the minillm model in `src_dir` to its transformers reference class and save it to `dst_dir`.

    Returns a summary: `{"architecture": ..., "reference": ..., "tokenizer_files": [...], "notes": [...]}`, the
    notes being what the reference class cannot do with this model.
    """
    from minillm.models.registry import MODEL_NAMES, model_package

    src, dst = resolve_model_dir(src_dir, option=None), Path(dst_dir)
    _check_destination(dst, src)
    model = load_causal_lm(src, "auto", None)
    model_type = model.config.model_type
    if model_type not in MODEL_NAMES:
        raise UserError(f"{src}: model_type {model_type!r} is not a minillm model ({', '.join(MODEL_NAMES)})")
    package = model_package(model_type)
    ref = package.to_reference(model)
    # what the reference class cannot do with this model (only mini_qwen3_next has such cases)
    notes = package.export_notes(model.config) if hasattr(package, "export_notes") else []
    ref.generation_config = model.generation_config  # eos/pad and sampling defaults travel with the model
    return {
        "architecture": model_type,
        "reference": type(ref).__name__,
        "tokenizer_files": _save_with_tokenizer(ref, src, dst),
        "notes": notes,
    }


def import_from_hf(src_dir: str | Path, dst_dir: str | Path) -> dict:
    """The reverse of `export_to_hf`: a transformers reference checkpoint (Llama, DeepSeek-V3, Qwen3-Next) saved
    as the matching minillm model. Returns the same kind of summary. A training checkpoint of a minillm run is
    written as the model directory its run's `final/` would be at that step."""
    from minillm.models.registry import MODEL_NAMES, model_package
    from minillm.training.checkpoint import is_checkpoint

    src, dst = resolve_model_dir(src_dir, option=None), Path(dst_dir)
    _check_destination(dst, src)
    if is_checkpoint(src):
        return _save_checkpoint_model(src, dst)
    try:
        declared = json.loads((src / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        declared = None  # load_causal_lm below reports what is wrong with the file
    if declared in MODEL_NAMES:
        raise UserError(f"{src}: already a minillm model ({declared}); --to minillm converts exports (--to hf) back")
    ref = load_causal_lm(src, "auto", None)
    model_type = REFERENCE_MODEL_TYPES.get(ref.config.model_type)
    if model_type is None:
        raise UserError(
            f"{src}: model_type {ref.config.model_type!r} has no minillm counterpart "
            f"(supported: {', '.join(REFERENCE_MODEL_TYPES)})"
        )
    try:
        model = model_package(model_type).from_reference(ref)
    except (ValueError, TypeError) as err:  # a config our architecture cannot take (a bad field, an activation)
        raise UserError(f"{src}: {load_error_reason(err)}") from None
    model.generation_config = ref.generation_config
    return {"architecture": model_type, "reference": type(ref).__name__,
            "tokenizer_files": _save_with_tokenizer(model, src, dst)}


def _save_checkpoint_model(src: Path, dst: Path) -> dict:
    model = load_causal_lm(src, "auto", None)
    return {"architecture": model.config.model_type, "reference": f"checkpoint {src.name}",
            "tokenizer_files": _save_with_tokenizer(model, src, dst)}


def _save_with_tokenizer(model, src: Path, dst: Path) -> list[str]:
    """Write `model` and the tokenizer files of `src` to `dst` (atomically); returns the tokenizer files copied.
    The length `src` was trained at goes into the config (`runs.trained_seq_len`), so `eval` scores the converted
    model in the windows it scored the original in."""
    tokenizer_files: list[str] = []
    seq_len = trained_seq_len(src)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer_files.extend(_copy_tokenizer_files(src, tmp))
        if seq_len is not None:
            config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            section, key = TRAINED_SEQ_LEN_KEY
            config[section] = {**(config.get(section) or {}), key: seq_len}
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    _write_atomically(dst, write)
    return tokenizer_files
