"""`minillm export`: convert a trained model to the native transformers architecture (or back).

    minillm export --to hf runs/sft_mini_llama3_20260101-120000 exported/llama   # a run dir or its final/
    minillm export --to minillm exported/llama back/                            # reference checkpoint -> minillm
    minillm export runs/pretrain_mini_llama3_.../checkpoints/step_00000400 step400-hf/   # a training checkpoint

The conversion itself lives in `minillm.models.export`.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("export")
    def export(
        src: Path = typer.Argument(
            ..., help="Model directory, run directory (its final/) or checkpoint of a run to convert."
        ),
        dst: Path = typer.Argument(..., help="New directory to write (must not exist or be empty)."),
        to: str = typer.Option(
            "hf", "--to",
            help="'hf': native transformers class; 'minillm': the reverse (from a checkpoint: a minillm model directory).",
        ),
    ) -> None:
        """Export a model as a native transformers checkpoint (Llama / DeepSeek-V3 / Qwen3-Next) that loads without
        minillm (vLLM, SGLang, llama.cpp converters), or import one back with --to minillm."""
        from rich.console import Console

        from minillm.errors import UserError
        from minillm.models.export import export_to_hf, import_from_hf

        if to not in ("hf", "minillm"):
            raise UserError(f"--to {to!r}: choose 'hf' or 'minillm'")
        console = Console()
        with console.status(f"converting {src} ..."):
            summary = (export_to_hf if to == "hf" else import_from_hf)(src, dst)
        console.print(
            f"wrote {dst}: {summary['reference'] if to == 'hf' else summary['architecture']} "
            f"(from {summary['architecture'] if to == 'hf' else summary['reference']})"
        )
        for note in summary.get("notes", []):
            console.print(f"[yellow]note:[/] {note}")
        if not summary["tokenizer_files"]:
            console.print(f"[yellow]note:[/] {src} has no tokenizer files; none were copied")
