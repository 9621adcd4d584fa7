"""The minillm tokenizer: byte-level BPE trained with `tokenizers`, saved as a `transformers` tokenizer directory.

    minillm tokenizer train --data corpus.parquet --vocab-size 32000 --out my_tokenizer
    tok = load_tokenizer()                 # the default one shipped in minillm/assets/tokenizer/

Notable choices:
- Byte-level BPE: every string (any script, any emoji) encodes without unknown tokens, and decoding is exact.
- The pre-tokenizer splits like Qwen2/Llama 3 (letters, single digits, punctuation runs, whitespace), so runs of
  Chinese characters stay one "word" and BPE can merge multi-character Chinese words.
- Vocabulary layout (as in the seed): a base vocabulary of `vocab_size` entries that includes `<|endoftext|>` (id 0,
  also eos and pad), then `<|im_start|>`, `<|im_end|>`, `<think>`, `</think>` added after it: 32,004 tokens for
  the default 32,000.
- The chat template is ChatML (`<|im_start|>role\\n...<|im_end|>\\n`). Assistant content and its closing
  `<|im_end|>` sit inside `{% generation %}` so `return_assistant_tokens_mask=True` marks exactly what SFT trains on.
- `tokenizer_fingerprint` hashes the vocabulary (tokens, ids, merges order is implied by the ids) so data
  manifests can refuse to train a model on ids from another tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from minillm.errors import UserError
from minillm.paths import apply_umask, check_creatable, check_not_working_directory, make_parent_dirs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"

EOS_TOKEN = "<|endoftext|>"
ADDED_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
SPECIAL_TOKENS = [EOS_TOKEN, *ADDED_TOKENS]


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end a generation: eos, and `<|im_end|>` when the vocabulary has it. A chat model ends its turn
    with the latter and never learns an eos after it, so anything that generates (our engine, `eval chat`, and
    transformers or vLLM reading an exported `generation_config.json`) must stop there too."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None and im_end not in stops:
        stops.append(int(im_end))
    return stops


def spelled_special_token(text: str, specials: Iterable[str] = SPECIAL_TOKENS) -> str | None:
    """The first of `specials` that `text` spells as characters, or None. A chat template's output is tokenized
    with special tokens recognised, so such text would become the control token itself (an end of turn, a forged
    turn): `data sft` skips such rows, `chat` and `serve` refuse such messages."""
    return next((token for token in specials if token in text), None)

# Qwen2 / Llama 3 style split: contractions, letter runs (optionally led by one non-letter), single digits,
# punctuation runs, newlines, other whitespace.
SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# ChatML with optional reasoning. An assistant message may carry `reasoning_content` (rendered as a <think> block);
# only the last assistant turn keeps it when `keep_all_thinking` is false (as in Qwen3), since earlier reasoning is
# not fed back in multi-turn chats. `{% generation %}` covers what the model must produce, including <|im_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message.get('reasoning_content') and (loop.last or keep_all_thinking is defined and keep_all_thinking) %}"
    "{{- '<think>\\n' + message['reasoning_content'] | trim + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def iter_texts_for_training(
    files: list[str], text_column: str = "text", max_chars_per_file: int | None = None
) -> Iterator[str]:
    """Yield documents from each file in turn, at most `max_chars_per_file` characters of each (to balance corpora).

    Files are read through `minillm.data.sources`, so parquet, jsonl, txt and globs all work.
    """
    from minillm.data.sources import iter_text_batches, resolve_inputs

    for source in resolve_inputs(files):
        used = 0
        for batch in iter_text_batches(source, text_column):
            for text in batch:
                if max_chars_per_file is not None and used >= max_chars_per_file:
                    break
                if max_chars_per_file is not None:
                    text = text[: max_chars_per_file - used]
                used += len(text)
                yield text
            if max_chars_per_file is not None and used >= max_chars_per_file:
                break


MAX_VOCAB_SIZE = 2**20


def run_interruptibly(work: Callable[[], object], poll_s: float = 0.1) -> None:
    """Run `work` in a daemon thread while the main thread waits for it in short joins, so Ctrl-C stops the wait at
    once. The Rust BPE trainer's merge phase releases the GIL but does not return to Python until it ends, so a
    KeyboardInterrupt would otherwise wait for the whole training (minutes on a large corpus). Nothing has been
    written then (the tokenizer is saved only after training). The abandoned thread cannot be stopped: it ends with
    the process (the CLI exits), but a Python caller that catches the KeyboardInterrupt and goes on leaves it
    training in the background until it finishes."""
    import threading

    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller's thread)
            failure.append(err)

    thread = threading.Thread(target=target, name="tokenizer-train", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(poll_s)
    if failure:
        raise failure[0]


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 32000,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it (tokenizer.json, config, chat template) to `out_dir`.

    `vocab_size` counts the base vocabulary including `<|endoftext|>`; the four chat/reasoning tokens come after.
    The directory is written to a temporary sibling and renamed, so a failed run leaves nothing behind.
    `show_progress=None` shows the Rust trainer's bars on a terminal only: they end each stage with a line break on
    stdout, which would otherwise land in a log or pipe.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 2:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least 258 tokens (the 256 bytes, "
            "<|endoftext|> and one merge)"
        )
    if vocab_size > MAX_VOCAB_SIZE:  # the Rust trainer allocates for the target size and aborts the process
        raise UserError(f"--vocab-size {vocab_size} is too large: at most {MAX_VOCAB_SIZE:,} (the largest "
                        "vocabularies in use hold about 256k tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stdout.isatty() and sys.stderr.isatty() if show_progress is None else show_progress,
    )
    run_interruptibly(lambda: tok.train_from_iterator(texts, trainer=trainer, length=length))
    if tok.get_vocab_size() <= 257:  # the byte alphabet and <|endoftext|> only
        raise UserError("the training text is too small to train a tokenizer (no merges learned)")
    tok.add_special_tokens(ADDED_TOKENS)
    return save_tokenizer(tok, out_dir)


# What `save_tokenizer` writes (some transformers versions add special_tokens_map.json): `--overwrite` replaces a
# directory holding these only.
SAVED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def check_tokenizer_out(out_dir: str | Path, overwrite: bool) -> None:
    """Raise `UserError` unless `out_dir` may receive a new tokenizer: it does not exist, is empty, or (with
    `overwrite`) holds a tokenizer and nothing else. Any other directory is refused, never emptied."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise UserError(f"--out {out_dir}: is a symbolic link; name the directory itself")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file, not a directory")
    check_not_working_directory(out_dir, "--out")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if held:
        if not overwrite:
            raise UserError(f"--out {out_dir}: already exists; choose another --out or pass --overwrite")
        others = [name for name in held if name not in SAVED_FILES]
        if "tokenizer.json" not in held or others:
            raise UserError(f"--out {out_dir}: holds files that are not a tokenizer's "
                            f"({', '.join(others or held)}); refusing to replace it")
    check_creatable(out_dir, "--out")


def save_tokenizer(tok, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` as a transformers tokenizer with our special tokens and chat template."""
    import shutil
    import tempfile

    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=ADDED_TOKENS,
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir).absolute()
    check_tokenizer_out(out_dir, overwrite=True)  # never replace a directory that holds anything else
    make_parent_dirs(out_dir, "--out")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    except OSError as err:
        raise UserError(f"--out {out_dir}: cannot write in {out_dir.parent} ({err.strerror or err})") from None
    try:
        hf_tok.save_pretrained(tmp)
        # Name the class every transformers version knows (5.x maps it to its tokenizers backend).
        config_path = tmp / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        apply_umask(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hf_tok


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory (None = the default shipped with minillm) and check it has our special tokens."""
    from transformers import AutoTokenizer

    directory = Path(path) if path is not None else DEFAULT_TOKENIZER_DIR
    if directory.is_file():
        raise UserError(f"tokenizer {directory}: a file; give the directory that holds tokenizer.json")
    if not directory.is_dir():
        raise UserError(f"tokenizer directory {directory} does not exist")
    if not (directory / "tokenizer.json").is_file():
        raise UserError(
            f"tokenizer directory {directory} has no tokenizer.json (train one with `minillm tokenizer train`)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:  # a corrupt tokenizer.json / config surfaces as many different exception types
        raise UserError(
            f"tokenizer directory {directory} cannot be loaded: {str(err).splitlines()[0]}"
        ) from None
    vocab = tok.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise UserError(f"tokenizer directory {directory} lacks the special tokens {', '.join(missing)}")
    if tok.eos_token != EOS_TOKEN:
        tok.eos_token = EOS_TOKEN
    if tok.pad_token is None:
        tok.pad_token = EOS_TOKEN
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary (token -> id) and merges, stored in data manifests and checked at training.

    Two tokenizers with the same fingerprint map text to the same ids, so token data built with one is valid for
    the other. Accepts a transformers tokenizer or a `tokenizers.Tokenizer`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    state = json.loads(backend.to_str())
    model = state.get("model", {})
    payload = {
        "vocab": sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]),
        "merges": model.get("merges"),
    }
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_dir_fingerprint(path: str | Path | None = None) -> str:
    """`tokenizer_fingerprint` of a tokenizer directory (None = the default), cached while tokenizer.json is unchanged.

    Cheap to call repeatedly (e.g. to find cached built-in data before deciding whether to build anything).
    """
    directory = Path(path) if path is not None else DEFAULT_TOKENIZER_DIR
    file = directory / "tokenizer.json"
    if not file.is_file():
        load_tokenizer(directory)  # raises the right UserError
    stat = file.stat()
    return _dir_fingerprint(str(file.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _dir_fingerprint(file: str, mtime_ns: int, size: int) -> str:
    return tokenizer_fingerprint(load_tokenizer(Path(file).parent))


def chars_per_token(tokenizer, texts: Iterable[str]) -> float:
    """Compression: characters (code points) per token over `texts`, without special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    texts = list(texts)
    n_chars = sum(len(t) for t in texts)
    n_tokens = sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))
    return n_chars / max(n_tokens, 1)
