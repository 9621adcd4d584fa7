"""`minillm eval`: how good is the model I trained.

    minillm eval ppl --model runs/pretrain_mini_llama3_<stamp>/final --data heldout.parquet --json ppl.json
    minillm eval ppl --model runs/pretrain_mini_llama3_<stamp>/final --data data/pretrain   # its val split
    minillm eval chat --model runs/sft_mini_llama3_<stamp>/final --data heldout_chat.jsonl
    minillm eval mc --model runs/pretrain_mini_llama3_<stamp>/final --data ceval_val.csv --dev ceval_dev.csv \
        --few-shot 5 --json ceval.json

All take any causal LM directory (ours, or one exported to a native transformers architecture) and default to the
newest finished run. Paths and options are checked before torch is imported, so mistakes fail fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

MODEL_HELP = (
    "Model directory (any HF causal LM directory), run directory (its final/) or checkpoint of a run; default: the "
    "newest finished SFT run, else the newest finished pretraining run."
)
DEVICE_HELP = "auto (CUDA, else MPS, else the CPU), cpu, cuda, cuda:N or mps."
DTYPE_HELP = "auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16, float16."


def register(app: typer.Typer) -> None:
    """Add the `eval` command group to the app."""
    eval_app = typer.Typer(
        help=(
            "Evaluate a model: perplexity and bits per byte on held-out text, chat loss and exact match, "
            "multiple-choice accuracy (C-Eval, CMMLU, MMLU, ARC)."
        ),
        no_args_is_help=True,
    )
    eval_app.command("ppl")(ppl)
    eval_app.command("chat")(chat)
    eval_app.command("mc")(mc)
    app.add_typer(eval_app, name="eval")


def ppl(
    data: list[str] = typer.Option(
        ...,
        "--data",
        help="Held-out .parquet/.jsonl/.json/.txt files or globs, or token shard directories (repeatable).",
    ),
    split: str = typer.Option("val", "--split", help="Split of a token shard directory given as --data."),
    model: Path | None = typer.Option(None, "--model", help=MODEL_HELP),
    text_column: str = typer.Option("text", "--text-column", help="Text column of parquet/jsonl files."),
    max_seq_len: int | None = typer.Option(
        None,
        "--max-seq-len",
        help="Window length (default: the row length the model's pretraining run trained at, else the model's "
        "maximum, capped at 2048).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    limit: int | None = typer.Option(
        None, "--limit", help="Score at most this many documents per file (windows per shard directory)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Perplexity and bits per byte (tokenizer-independent) of a model on held-out text."""
    from minillm.devices import resolve_device
    from minillm.evaluation import loading, perplexity, report
    from minillm.paths import check_output_file
    from minillm.runs import resolve_model_dir, trained_seq_len

    _check_positive(max_seq_len=max_seq_len, batch_size=batch_size, limit=limit)
    files = perplexity.expand_data_paths(data)
    model_dir = resolve_model_dir(model)
    check_output_file(json_out, "--json", overwrite, [*files, model_dir])
    torch_device = resolve_device(device)
    lm, tokenizer = loading.load_model_and_tokenizer(
        model_dir, torch_device, loading.resolve_dtype(dtype, torch_device)
    )
    if max_seq_len is None and (trained := trained_seq_len(model_dir)):
        # positions past the training rows were never learned: longer windows would score extrapolation
        max_seq_len = min(trained, getattr(lm.config, "max_position_embeddings", None) or trained)
    results = perplexity.evaluate_files(
        lm, tokenizer, files, text_column, max_seq_len, batch_size, torch_device, limit=limit, split=split
    )
    results = {"model": str(model_dir), **results}
    report.print_table(report.perplexity_table(results))
    if json_out is not None:
        report.write_json(results, json_out)


def chat(
    data: Path = typer.Option(
        ..., "--data", help="Held-out conversations: .jsonl/.json/.parquet in the formats `minillm data sft` takes."
    ),
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Teacher-forced loss on assistant tokens, and greedy exact match on short answers."""
    from minillm.devices import resolve_device
    from minillm.evaluation import chat as chat_eval
    from minillm.evaluation import loading, report
    from minillm.paths import check_output_file
    from minillm.runs import resolve_model_dir

    _check_positive(max_seq_len=max_seq_len, batch_size=batch_size, max_new_tokens=max_new_tokens)
    model_dir = resolve_model_dir(model)
    check_output_file(json_out, "--json", overwrite, [data, model_dir])
    conversations, invalid = chat_eval.read_conversations(data)
    torch_device = resolve_device(device)
    lm, tokenizer = loading.load_model_and_tokenizer(
        model_dir, torch_device, loading.resolve_dtype(dtype, torch_device)
    )
    results = chat_eval.evaluate_chat(
        lm, tokenizer, conversations, max_seq_len, batch_size, torch_device, max_new_tokens=max_new_tokens
    )
    results = {"model": str(model_dir), "data": str(data), **results, **invalid}
    report.print_table(report.chat_table(results))
    if invalid["invalid_rows"]:
        rows = f"{invalid['invalid_rows']} row{'s' if invalid['invalid_rows'] > 1 else ''}"
        print(f"note: skipped {rows} that `minillm data sft` would skip too (first: {invalid['first_invalid'][0]})",
              file=sys.stderr)
    if json_out is not None:
        report.write_json(results, json_out)


def _check_hub_options(
    data: str, dev: str | None, config: str | None, split: str | None, dev_split: str | None
) -> None:
    """Refuse --config/--split/--dev-split where no Hugging Face dataset would take them: silently ignored, a
    user asking for C-Eval's `val` split of a local file would be scored on whatever the file holds."""
    from minillm.errors import UserError
    from minillm.evaluation.multiple_choice import names_hub_dataset

    if dev_split is not None and dev is None:
        raise UserError(f"--dev-split {dev_split}: only used with --dev DATASET")
    for option, value, flag, source in (("--split", split, "--data", data), ("--dev-split", dev_split, "--dev", dev)):
        if value is not None and not names_hub_dataset(source):
            raise UserError(f"{option} {value}: {flag} {source} is a local file (the option picks a split of a "
                            "Hugging Face dataset)")
    if config is not None and not any(names_hub_dataset(s) for s in (data, dev) if s is not None):
        raise UserError(f"--config {config}: --data {data} is a local file (the option picks a configuration "
                        "of a Hugging Face dataset)")


def mc(
    data: str = typer.Option(
        ...,
        "--data",
        help="Questions: a .jsonl/.json/.csv/.parquet file, or a Hugging Face dataset name (see --config/--split).",
    ),
    model: Path | None = typer.Option(None, "--model", help=MODEL_HELP),
    config: str | None = typer.Option(
        None, "--config", help="Dataset configuration (subject) of a hub dataset."
    ),
    split: str | None = typer.Option(
        None, "--split", help="Split of a hub dataset given as --data (default: test)."
    ),
    dev: str | None = typer.Option(
        None,
        "--dev",
        help="Solved examples for --few-shot: a file or hub dataset (C-Eval/CMMLU/MMLU dev sets).",
    ),
    dev_split: str | None = typer.Option(
        None, "--dev-split", help="Split of a hub dataset given as --dev (default: dev)."
    ),
    few_shot: int = typer.Option(0, "--few-shot", help="Solved examples from --dev before each question."),
    style: str = typer.Option(
        "cloze",
        "--style",
        help="cloze: score each choice's text (ARC style); letters: list the choices, score A/B/C/D (MMLU style).",
    ),
    chat: bool = typer.Option(
        False, "--chat", help="Ask through the tokenizer's chat template (SFT models)."
    ),
    max_seq_len: int | None = typer.Option(
        None,
        "--max-seq-len",
        help="Longest input; longer prompts lose their start (default: the model's maximum).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions per forward pass (all their choices)."),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate only the first N questions."),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the results and every question's scores to this JSON file."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --json file."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Multiple-choice accuracy by log-likelihood (acc, acc_norm, acc_bytes as in lm-evaluation-harness)."""
    from minillm.devices import resolve_device
    from minillm.errors import UserError
    from minillm.evaluation import loading, report
    from minillm.evaluation import multiple_choice as mc_eval
    from minillm.paths import check_output_file
    from minillm.runs import resolve_model_dir

    _check_positive(max_seq_len=max_seq_len, batch_size=batch_size, limit=limit)
    if few_shot < 0:
        raise UserError(f"--few-shot {few_shot}: must be 0 or more")
    if few_shot and dev is None:
        raise UserError(
            f"--few-shot {few_shot} needs solved examples: pass --dev FILE (e.g. C-Eval's dev split)"
        )
    if dev is not None and not few_shot:
        raise UserError(f"--dev {dev}: solved examples are only used with --few-shot K (K >= 1)")
    if style not in mc_eval.STYLES:
        raise UserError(f"--style {style}: expected one of {', '.join(mc_eval.STYLES)}")
    _check_hub_options(data, dev, config, split, dev_split)
    model_dir = resolve_model_dir(model)
    check_output_file(json_out, "--json", overwrite, [data, model_dir] + ([dev] if dev else []))
    questions = mc_eval.load_questions(data, config, split or "test", limit=limit)
    dev_questions = mc_eval.load_questions(dev, config, dev_split or "dev", option="--dev") if few_shot else None
    torch_device = resolve_device(device)
    lm, tokenizer = loading.load_model_and_tokenizer(
        model_dir, torch_device, loading.resolve_dtype(dtype, torch_device)
    )
    results = mc_eval.evaluate_multiple_choice(
        lm,
        tokenizer,
        questions,
        dev=dev_questions,
        few_shot=few_shot,
        style=style,
        chat=chat,
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        device=torch_device,
    )
    results = {"model": str(model_dir), "data": data, "dev": dev if few_shot else None, **results}
    report.print_table(mc_eval.results_table(results))
    if json_out is not None:
        report.write_json(results, json_out)


def _check_positive(**options: int | None) -> None:
    from minillm.errors import UserError

    for name, value in options.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
