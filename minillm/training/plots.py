"""The loss-curve PNG written at the end of a run (and readable while it runs: it is rewritten atomically).

Panels, three to a row: training loss (the logged steps faint, their moving average on top once there are enough
of them; validation loss as points when logged), learning rate, gradient norm (on a log scale when it spans more
than a factor of 100, so one spike does not flatten the rest) and, for MoE models, the auxiliary losses (sequence
aux, router aux, MTP; unweighted) and the per-layer expert load (the busiest expert's over the mean: 1 is a
perfectly balanced router).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

SMOOTH_FROM = 20  # logged points from which the loss panel adds a moving average


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def _moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` finite values at each point (skipped steps log NaN)."""
    out, recent = [], []
    for v in values:
        if math.isfinite(v):
            recent = (recent + [v])[-window:]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Draw the panels that have data; returns the PNG path, or None when nothing was logged."""
    if not any("loss" in r for r in records):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aux_keys = sorted({k for r in records for k in r if k.startswith("loss/") and k != "loss/lm"})
    ratio_keys = sorted({k for r in records for k in r if k.startswith("moe/") and k.endswith("max_over_mean")},
                        key=lambda k: int(k.split("/")[1].split("_")[1]))  # layer_10 after layer_9
    panels = ["loss", "lr", "grad_norm"] + (["aux"] if aux_keys else []) + (["moe"] if ratio_keys else [])
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        if panel == "loss":
            steps, losses = _series(records, "loss")
            if len(steps) >= SMOOTH_FROM:
                ax.plot(steps, losses, alpha=0.3, color="C0")
                window = max(2, len(steps) // 20)
                ax.plot(steps, _moving_average(losses, window), color="C0", label=f"train (mean of {window} logs)")
            else:
                ax.plot(steps, losses, color="C0", label="train")
            if any("val/loss" in r for r in records):
                ax.plot(*_series(records, "val/loss"), "o-", color="C1", label="val")
            ax.set_title("loss")
            ax.set_ylabel("nats / token")
            ax.legend()
        elif panel == "lr":
            ax.plot(*_series(records, "lr"))
            ax.set_title("learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        elif panel == "grad_norm":
            steps, norms = _series(records, "grad_norm")
            ax.plot(steps, norms)
            finite = [n for n in norms if math.isfinite(n) and n > 0]
            if finite and max(finite) > 100 * min(finite):
                ax.set_yscale("log")
            ax.set_title("gradient norm (before clipping)")
        elif panel == "aux":
            for key in aux_keys:
                ax.plot(*_series(records, key), label=key.split("/", 1)[1])
            ax.set_title("auxiliary losses (unweighted)")
            ax.legend()
        elif panel == "moe":
            for key in ratio_keys:
                ax.plot(*_series(records, key), label=key.split("/")[1])
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
            ax.set_title("busiest expert's load / mean (1 = balanced)")
            ax.legend(fontsize="small", ncol=1 + len(ratio_keys) // 6)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5 on short runs
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
