"""Print the configuration reference of `minillm pretrain` / `minillm sft` as a markdown table.

    python scripts/gen_config_reference.py                    # print the table
    python scripts/gen_config_reference.py --write README.md  # replace the table between the README's markers
    python scripts/gen_config_reference.py --check README.md  # exit 1 if the README's table is stale

The table is generated from `minillm.training.config.TrainConfig`: one row per field, with its recipe key, its CLI
flag, the commands that expose it, its default, and the help text stored in the field's metadata. Defaults that
the dataclass leaves `None` are filled from `STAGE_DEFAULTS` (pretrain / sft) and, in one column per preset that
changes some (`small`, `base`), from `PRESET_DEFAULTS`, which is what `TrainConfig.resolve()` does; a default that
differs between pretrain and sft is shown as `pretrain / sft`. Fields that no command exposes (`stage`) are left out.

In a markdown file the table sits between the lines `<!-- config-reference:start -->` and
`<!-- config-reference:end -->`; `--check` (run by the README checker) fails when a field was added or changed
without regenerating it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minillm.training.config import PRESET_DEFAULTS, STAGE_DEFAULTS, STAGES, TrainConfig  # noqa: E402


def _show(value: Any) -> str:
    """A default as it would be written in a recipe (`—` for none)."""
    if value is None or value == {}:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`"


def _default(f: dataclasses.Field, stages: tuple[str, ...]) -> str:
    """The resolved default of field `f` for each stage that exposes it; one value when they agree."""
    if f.default is not dataclasses.MISSING:
        base = f.default
    elif f.default_factory is not dataclasses.MISSING:
        base = f.default_factory()
    else:
        base = None
    values = [STAGE_DEFAULTS[stage].get(f.name, base) if base is None else base for stage in stages]
    if f.name == "global_batch_size":  # resolve(): the global batch defaults to the micro batch
        values = [v if v is not None else STAGE_DEFAULTS[s]["micro_batch_size"] for v, s in zip(values, stages, strict=True)]
    shown = [_show(v) for v in values]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


def reference_table() -> str:
    """The markdown table: key, flag, commands, default, the default of each preset that changes some, description."""
    presets = [name for name, changes in PRESET_DEFAULTS.items() if changes]
    rows = [
        "| recipe key | flag | commands | default | " + "".join(f"`--preset {p}` | " for p in presets) + "meaning |",
        "|---|---|---|---|" + "---|" * len(presets) + "---|",
    ]
    for f in dataclasses.fields(TrainConfig):
        stages = tuple(s for s in STAGES if s in f.metadata.get("stages", ()))
        if not stages:
            continue
        flag = "--model-arg K=V" if f.name == "model_args" else "--" + f.name.replace("_", "-")
        if str(f.type).startswith("bool"):
            flag += f" / --no-{f.name.replace('_', '-')}"
        by_preset = "".join(
            (_show(PRESET_DEFAULTS[p][f.name]) if "pretrain" in stages and f.name in PRESET_DEFAULTS[p] else "")
            + " | "
            for p in presets
        )
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{flag}` | {', '.join(stages)} | {_default(f, stages)} | {by_preset}{help_text} |")
    return "\n".join(rows)


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def replace_table(markdown: str, table: str) -> str:
    """`markdown` with the text between the START and END marker lines replaced by `table`."""
    start, end = markdown.find(START), markdown.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no '{START}' ... '{END}' lines")
    return markdown[: start + len(START)] + "\n" + table + "\n" + markdown[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="MD", help="Replace the table between the markers of MD.")
    group.add_argument("--check", type=Path, metavar="MD", help="Exit 1 when the table in MD is not up to date.")
    args = parser.parse_args(argv)
    table = reference_table()
    path = args.write or args.check
    if path is None:
        print(table)
        return 0
    try:
        text = path.read_text(encoding="utf-8")
        updated = replace_table(text, table)
    except (OSError, ValueError) as err:
        print(f"error: {path}: {err}", file=sys.stderr)
        return 2
    if args.check:
        if updated != text:
            print(f"{path}: the configuration reference is stale; run "
                  f"`python scripts/gen_config_reference.py --write {path}`", file=sys.stderr)
            return 1
        print(f"{path}: configuration reference up to date")
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(updated, encoding="utf-8")
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
