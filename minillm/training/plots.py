"""The loss-curve PNG written at the end of a run (and readable while it runs: it is rewritten atomically).

Panels: training loss (with validation loss when logged) and perplexity, learning rate, gradient norm and, for MoE
models, the auxiliary losses (sequence aux, router aux, MTP) and the per-layer expert load (max/min ratio: 1 is a
perfectly balanced router).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Draw the panels that have data; returns the PNG path, or None when nothing was logged."""
    if not any("loss" in r for r in records):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aux_keys = sorted({k for r in records for k in r if k.startswith("loss/") and k != "loss/lm"})
    ratio_keys = sorted({k for r in records for k in r if k.startswith("moe/") and k.endswith("max_min_ratio")})
    panels = ["loss", "lr", "grad_norm"] + (["aux"] if aux_keys else []) + (["moe"] if ratio_keys else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "loss":
            ax.plot(*_series(records, "loss"), label="train")
            if any("val/loss" in r for r in records):
                ax.plot(*_series(records, "val/loss"), "o-", label="val")
            ax.set_title("loss")
            ax.legend()
        elif panel == "lr":
            ax.plot(*_series(records, "lr"))
            ax.set_title("learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        elif panel == "grad_norm":
            ax.plot(*_series(records, "grad_norm"))
            ax.set_title("gradient norm (before clipping)")
        elif panel == "aux":
            for key in aux_keys:
                ax.plot(*_series(records, key), label=key.split("/", 1)[1])
            ax.set_title("auxiliary losses")
            ax.legend()
        elif panel == "moe":
            for key in ratio_keys:
                ax.plot(*_series(records, key), label=key.split("/")[1])
            ax.set_yscale("log")  # one idle expert sends the ratio to the thousands
            ax.set_title("expert load max/min (1 = balanced)")
            ax.legend(fontsize="small")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
