"""`minillm info`: parameter counts and training FLOPs per token of a model preset.

    minillm info --model mini_deepseekv3 --preset base
    minillm info --model mini_llama3 --preset base --seq-len 1024

The numbers come from `minillm.models.stats` (the model is built on the meta device: instant, no memory).
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("info")
    def info(
        model: str = typer.Option(
            "mini_llama3", "--model", help="mini_llama3, mini_deepseekv3 or mini_qwen3_next."
        ),
        preset: str = typer.Option("tiny", "--preset", help="Size preset (tiny, base)."),
        seq_len: int = typer.Option(
            0, "--seq-len", help="Sequence length for attention FLOPs (0: the model's max)."
        ),
    ) -> None:
        """Print total, activated (MoE), MTP and non-embedding parameters and training FLOPs per token."""
        from rich.console import Console
        from rich.table import Table

        from minillm.errors import UserError
        from minillm.models.stats import config_stats

        if seq_len < 0:
            raise UserError(f"--seq-len {seq_len}: must be positive (or 0 for the model's maximum)")
        stats = config_stats(model, preset, seq_len=seq_len or None)
        table = Table(title=f"{model} ({preset})")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        table.add_column("millions", justify="right")
        rows = [
            ("total parameters", stats.total),
            ("embedding parameters", stats.embedding),
            ("non-embedding parameters", stats.non_embedding),
            ("activated parameters / token", stats.activated),
            ("activated non-embedding", stats.activated_non_embedding),
            ("MTP parameters (training only)", stats.mtp),
            (f"training FLOPs / token (seq {stats.seq_len})", stats.flops_per_token),
        ]
        for name, value in rows:
            table.add_row(name, f"{value:,}", f"{value / 1e6:,.1f}")
        Console().print(table)
