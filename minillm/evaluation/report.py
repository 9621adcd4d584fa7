"""Showing evaluation results: a rich table on stdout and an optional JSON file (written atomically)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from minillm.paths import write_output_file


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write `data` as JSON to `path` (`minillm.paths.write_output_file`: no partial file is left behind)."""
    write_output_file(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n", "--json")


def perplexity_table(report: dict[str, Any]) -> Table:
    """One row per file and a total row: documents, tokens, bytes, loss, perplexity, bits per byte."""
    table = Table(title=f"perplexity: {report['model']} (windows of {report['max_seq_len']:,} tokens)",
                  title_justify="left")
    for name in ("file", "docs", "tokens", "bytes", "loss", "ppl", "bpb"):
        table.add_column(name, justify="left" if name == "file" else "right")
    rows = (
        [*report["files"], {"file": "total", **report["total"]}]
        if len(report["files"]) > 1
        else report["files"]
    )
    for row in rows:
        table.add_row(
            Path(row["file"]).name if row["file"] != "total" else "[bold]total",
            f"{row['documents']:,}",
            f"{row['tokens']:,}",
            f"{row['bytes']:,}",
            f"{row['loss']:.4f}",
            f"{row['ppl']:.3f}",
            f"{row['bpb']:.4f}",
        )
    return table


def chat_table(report: dict[str, Any]) -> Table:
    """Assistant-token loss and exact match of one chat evaluation."""
    table = Table(title=f"chat eval: {report['model']}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    em = report["exact_match"]
    table.add_row("conversations", f"{report['conversations']:,} ({report['truncated']} truncated)")
    table.add_row("assistant tokens", f"{report['assistant_tokens']:,}")
    table.add_row("assistant loss", f"{report['loss']:.4f}")
    table.add_row("assistant ppl", f"{report['ppl']:.3f}")
    rate = "n/a" if em["rate"] is None else f"{em['rate']:.1%}"
    table.add_row("exact match", f"{em['correct']}/{em['items']} ({rate})")
    return table


def print_table(table: Table) -> None:
    Console().print(table)
