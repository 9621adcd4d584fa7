"""Print the configuration reference of `minillm pretrain` / `minillm sft` as a markdown table.

    python scripts/gen_config_reference.py            # paste the output into README.md

The table is generated from `minillm.training.config.TrainConfig`: one row per field, with its recipe key, its CLI
flag, the commands that expose it, its default, and the help text stored in the field's metadata. Defaults that
the dataclass leaves `None` are filled from `STAGE_DEFAULTS` (pretrain / sft) and, for the `base` preset, from
`PRESET_DEFAULTS`, which is what `TrainConfig.resolve()` does; a default that differs between pretrain and sft is
shown as `pretrain / sft`. Fields that no command exposes (`stage`) are left out.
"""

from __future__ import annotations

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
        values = [v if v is not None else STAGE_DEFAULTS[s]["micro_batch_size"] for v, s in zip(values, stages)]
    shown = [_show(v) for v in values]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


def reference_table() -> str:
    """The markdown table: key, flag, commands, default, `--preset base` default, description."""
    rows = [
        "| recipe key | flag | commands | default | `--preset base` | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for f in dataclasses.fields(TrainConfig):
        stages = tuple(s for s in STAGES if s in f.metadata.get("stages", ()))
        if not stages:
            continue
        flag = "--model-arg K=V" if f.name == "model_args" else "--" + f.name.replace("_", "-")
        if str(f.type).startswith("bool"):
            flag += f" / --no-{f.name.replace('_', '-')}"
        base = _show(PRESET_DEFAULTS["base"][f.name]) if "pretrain" in stages and f.name in PRESET_DEFAULTS["base"] \
            else ""
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(
            f"| `{f.name}` | `{flag}` | {', '.join(stages)} | {_default(f, stages)} | {base} | {help_text} |"
        )
    return "\n".join(rows)


def main() -> int:
    print(reference_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
