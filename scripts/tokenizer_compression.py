"""Measure a tokenizer's compression (characters per token) on each corpus and write it as JSON and markdown.

    python scripts/tokenizer_compression.py --tokenizer minillm/assets/tokenizer --skip-chars 4000000 \
        --out scripts/default_tokenizer_compression ../shared/data/*.parquet

`--skip-chars N` also reports the held-out compression on the documents after the first N characters of each file
(the ones `minillm tokenizer train --max-chars-per-file N` did not see), when there are any.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minillm.data.sources import iter_text_batches, resolve_inputs
from minillm.tokenizer import chars_per_token, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer directory (default: the shipped one).")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--skip-chars", type=int, default=None)
    parser.add_argument(
        "--out", required=True, help="Output path without suffix (.json and .md are written)."
    )
    args = parser.parse_args()

    tok = load_tokenizer(args.tokenizer)
    results = []
    for source in resolve_inputs(args.files):
        docs = [t for batch in iter_text_batches(source, args.text_column) for t in batch]
        row = {"file": Path(source.name).name, "documents": len(docs), "characters": sum(map(len, docs))}
        row["chars_per_token"] = round(chars_per_token(tok, docs), 3)
        if args.skip_chars:
            seen, held_out = 0, []
            for doc in docs:
                if seen >= args.skip_chars:
                    held_out.append(doc)
                seen += len(doc)
            if held_out:
                row["held_out_characters"] = sum(map(len, held_out))
                row["held_out_chars_per_token"] = round(chars_per_token(tok, held_out), 3)
        results.append(row)
        print(row)

    out = Path(args.out)
    report = {"tokenizer_size": len(tok), "corpora": results}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"Compression of the tokenizer ({len(tok):,} tokens), characters (code points) per token:",
        "",
        "| corpus | characters | chars/token (whole corpus) | chars/token (held-out documents) |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        held = (
            f"{r['held_out_chars_per_token']:.3f} ({r['held_out_characters']:,} chars)"
            if "held_out_chars_per_token" in r
            else "— (all used in training)"
        )
        lines.append(f"| {r['file']} | {r['characters']:,} | {r['chars_per_token']:.3f} | {held} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
