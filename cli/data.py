"""`minillm tokenizer ...` and `minillm data ...`: train a tokenizer, turn raw text and chats into token data.

minillm tokenizer train --data corpus.parquet --vocab-size 32000 --out my_tokenizer
minillm data pretrain --input 'corpus/*.parquet' --out data/pretrain --val-fraction 0.01
minillm data sft --input chats.jsonl --max-seq-len 512 --out data/sft --pack
"""

from __future__ import annotations

from pathlib import Path

import typer

tokenizer_app = typer.Typer(help="Train a tokenizer.", no_args_is_help=True)
data_app = typer.Typer(
    help="Build training data: pretraining token shards and SFT sets.", no_args_is_help=True
)


@tokenizer_app.command("train")
def tokenizer_train(
    data: list[str] = typer.Option(..., "--data", help="Text files / globs / HF names; repeat for several."),
    out: Path = typer.Option(..., "--out", help="Output tokenizer directory."),
    vocab_size: int = typer.Option(
        32000, "--vocab-size", help="Base vocabulary incl. <|endoftext|>; 4 more follow."
    ),
    text_column: str = typer.Option("text", "--text-column", help="Column / field holding the text."),
    max_chars_per_file: int | None = typer.Option(
        None, "--max-chars-per-file", help="Use at most this many characters of each file (balances corpora)."
    ),
    min_frequency: int = typer.Option(2, "--min-frequency", help="Minimum pair count for a merge.", min=1),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing tokenizer directory (one holding nothing else)."
    ),
) -> None:
    """Train a byte-level BPE tokenizer (with the chat template) that `AutoTokenizer.from_pretrained` loads."""
    from rich.console import Console

    from minillm.data.sources import resolve_inputs
    from minillm.errors import UserError
    from minillm.tokenizer import (
        chars_per_token,
        check_tokenizer_out,
        iter_texts_for_training,
        train_tokenizer,
    )

    console = Console(stderr=True, soft_wrap=True)
    check_tokenizer_out(out, overwrite)  # before hours of training, and never an unrelated directory
    if max_chars_per_file is not None and max_chars_per_file < 1:
        raise UserError(f"--max-chars-per-file must be >= 1, got {max_chars_per_file}")
    sources = resolve_inputs(data, flag="--data")
    texts = iter_texts_for_training([s.name for s in sources], text_column, max_chars_per_file)
    first = next(texts, None)
    if first is None:
        raise UserError(f"{', '.join(data)}: no text found in column '{text_column}'")

    def all_texts():
        yield first
        yield from texts

    tok = train_tokenizer(all_texts(), out, vocab_size=vocab_size, min_frequency=min_frequency)
    short = (f" (a vocabulary of {tok.vocab_size:,}, not the {vocab_size:,} asked for: the data held no more merges"
             f"{' seen --min-frequency times' if min_frequency > 1 else ''}; more text gives more)"
             if tok.vocab_size < vocab_size else "")
    console.print(f"saved tokenizer with {len(tok):,} tokens to {out}{short}")
    for source in sources:
        sample = list(iter_texts_for_training([source.name], text_column, max_chars_per_file=200_000))
        if sample:
            console.print(f"  {source.name}: {chars_per_token(tok, sample):.3f} characters/token")


@data_app.command("pretrain")
def data_pretrain(
    input: list[str] = typer.Option(
        ..., "--input", help="Files, globs, directories or an HF dataset name; repeatable."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory for the token shards and manifest.json."),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="Tokenizer directory (default: the shipped one)."
    ),
    text_column: str = typer.Option("text", "--text-column", help="Column / field holding the text."),
    val_fraction: float = typer.Option(
        0.0, "--val-fraction", help="Fraction of documents held out as the val split."
    ),
    shard_tokens: int = typer.Option(100_000_000, "--shard-tokens", help="Tokens per shard file."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing data directory built by minillm."
    ),
) -> None:
    """Tokenize raw text (parquet / jsonl / txt / HF dataset) into flat token shards for pretraining."""
    from rich.console import Console

    from minillm.data.pretrain import build_pretrain_shards

    m = build_pretrain_shards(
        input,
        out,
        tokenizer,
        text_column=text_column,
        val_fraction=val_fraction,
        shard_tokens=shard_tokens,
        overwrite=overwrite,
    )
    mb = sum(s["bytes"] for s in m["sources"]) / 1e6
    split_info = ", ".join(
        f"{k}: {v['tokens']:,} tokens / {v['documents']:,} docs" for k, v in m["splits"].items()
    )
    Console(stderr=True, soft_wrap=True).print(
        f"wrote {out}: {m['tokens']:,} tokens ({m['dtype']}) from {m['documents']:,} documents ({split_info}); "
        f"{m['characters'] / max(m['tokens'] - m['documents'], 1):.2f} chars/token; {mb:.1f} MB in {m['seconds']:.1f} s"
    )


@data_app.command("sft")
def data_sft(
    input: list[str] = typer.Option(
        ..., "--input", help="Chat jsonl / parquet files, globs or an HF name; repeatable."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    max_seq_len: int = typer.Option(512, "--max-seq-len", help="Longest row in tokens."),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="Tokenizer directory (default: the shipped one)."
    ),
    pack: bool = typer.Option(
        False, "--pack", help="Pack conversations into full rows (best-fit-decreasing)."
    ),
    truncation: str = typer.Option(
        "turn", "--truncation", help="Too-long conversations: 'turn' (cut) or 'drop'."
    ),
    val_fraction: float = typer.Option(
        0.0, "--val-fraction", help="Fraction of conversations held out as the val split (val/loss in training)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing data directory built by minillm."
    ),
) -> None:
    """Template, tokenize and label-mask chats (messages / ShareGPT / Alpaca) for SFT; optionally pack them."""
    from rich.console import Console

    from minillm.data.sft import build_sft_dataset, format_summary

    m = build_sft_dataset(
        input, out, tokenizer, max_seq_len=max_seq_len, pack=pack, truncation=truncation, overwrite=overwrite,
        val_fraction=val_fraction,
    )
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"wrote {out} in {m['seconds']:.1f} s\n" + format_summary(m["summary"], max_seq_len, pack),
        markup=False,
    )


def register(app: typer.Typer) -> None:
    """Add the `tokenizer` and `data` command groups to the app."""
    app.add_typer(tokenizer_app, name="tokenizer")
    app.add_typer(data_app, name="data")
