"""`minillm eval`: how good is the model I trained.

    minillm eval ppl --model runs/pretrain_mini_llama3_<stamp>/final --data heldout.parquet --json ppl.json
    minillm eval ppl --model runs/pretrain_mini_llama3_<stamp>/final --data data/pretrain   # its val split
    minillm eval chat --model runs/sft_mini_llama3_<stamp>/final --data heldout_chat.jsonl

Both take any causal LM directory (ours, or one exported to a native transformers architecture) and default to the
newest finished run. Paths and options are checked before torch is imported, so mistakes fail fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

MODEL_HELP = (
    "Model directory (a run's final/ or any HF causal LM directory); default: the newest finished run."
)
DEVICE_HELP = "auto (CUDA when available), cpu, cuda, cuda:N, mps."
DTYPE_HELP = "auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16, float16."


def register(app: typer.Typer) -> None:
    """Add the `eval` command group to the app."""
    eval_app = typer.Typer(
        help="Evaluate a model: perplexity and bits per byte on held-out text, chat loss and exact match.",
        no_args_is_help=True,
    )
    eval_app.command("ppl")(ppl)
    eval_app.command("chat")(chat)
    app.add_typer(eval_app, name="eval")


def ppl(
    data: list[str] = typer.Option(
        ...,
        "--data",
        help="Held-out .parquet/.jsonl/.txt files or globs, or token shard directories (repeatable).",
    ),
    split: str = typer.Option("val", "--split", help="Split of a token shard directory given as --data."),
    model: Path | None = typer.Option(None, "--model", help=MODEL_HELP),
    text_column: str = typer.Option("text", "--text-column", help="Text column of parquet/jsonl files."),
    max_seq_len: int | None = typer.Option(
        None, "--max-seq-len", help="Window length (default: the model's maximum, capped at 2048)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    limit: int | None = typer.Option(
        None, "--limit", help="Score at most this many documents per file (windows per shard directory)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Perplexity and bits per byte (tokenizer-independent) of a model on held-out text."""
    from minillm.evaluation import loading, perplexity, report

    _check_positive(max_seq_len=max_seq_len, batch_size=batch_size, limit=limit)
    files = perplexity.expand_data_paths(data)
    model_dir = loading.resolve_model_dir(model)
    torch_device = loading.resolve_device(device)
    lm, tokenizer = loading.load_model_and_tokenizer(
        model_dir, torch_device, loading.resolve_dtype(dtype, torch_device)
    )
    results = perplexity.evaluate_files(
        lm, tokenizer, files, text_column, max_seq_len, batch_size, torch_device, limit=limit, split=split
    )
    results = {"model": str(model_dir), **results}
    report.print_table(report.perplexity_table(results))
    if json_out is not None:
        report.write_json(results, json_out)


def chat(
    data: Path = typer.Option(..., "--data", help="Held-out conversations, jsonl in the `messages` format."),
    model: Path | None = typer.Option(None, "--model", help=MODEL_HELP),
    max_seq_len: int | None = typer.Option(
        None,
        "--max-seq-len",
        help="Truncate conversations to this (default: the model's maximum, capped at 2048).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Conversations per forward pass / generate call."),
    max_new_tokens: int = typer.Option(
        32,
        "--max-new-tokens",
        help="Greedy answer length; answers up to this many tokens count for exact match.",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write results and every answer to JSON."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Teacher-forced loss on assistant tokens, and greedy exact match on short answers."""
    from minillm.evaluation import chat as chat_eval
    from minillm.evaluation import loading, report

    _check_positive(max_seq_len=max_seq_len, batch_size=batch_size, max_new_tokens=max_new_tokens)
    conversations = chat_eval.read_conversations(data)
    model_dir = loading.resolve_model_dir(model)
    torch_device = loading.resolve_device(device)
    lm, tokenizer = loading.load_model_and_tokenizer(
        model_dir, torch_device, loading.resolve_dtype(dtype, torch_device)
    )
    results = chat_eval.evaluate_chat(
        lm, tokenizer, conversations, max_seq_len, batch_size, torch_device, max_new_tokens=max_new_tokens
    )
    results = {"model": str(model_dir), "data": str(data), **results}
    report.print_table(report.chat_table(results))
    if json_out is not None:
        report.write_json(results, json_out)


def _check_positive(**options: int | None) -> None:
    from minillm.errors import UserError

    for name, value in options.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
