"""Pictures of a search and its samples: quality against FLOPs, a schedule step by step, sample grids."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from ..sampling.schedule import Schedule
from .evaluate import Evaluator


def save_grid(images: Any, path: Path, nrow: int = 8) -> None:
    """Save images in [-1, 1] (N, C, H, W) as one PNG grid with a 1-pixel border."""
    import numpy as np
    import torch
    from PIL import Image

    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.zeros((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), dtype=np.uint8)
    pix = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = pix[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_tradeoff(records: list[dict[str, Any]], front: list[dict[str, Any]], evaluator: Evaluator, bound: float,
                  path: Path) -> None:
    """Quality against FLOPs: all trials, the Pareto front of the schedules meeting the bound, the bound,
    the threshold family, static native and weak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["fraction"] for r in records], [r["quality"] for r in records], s=10, c="0.7", label="trials")
    fam = sorted((r for r in records if r["family"] == "threshold"), key=lambda r: r["fraction"])
    ax.plot([r["fraction"] for r in fam], [r["quality"] for r in fam], "o-", c="tab:blue", label="weak first k (paper)")
    ax.plot([r["fraction"] for r in front], [r["quality"] for r in front], "s-", c="tab:red", label="Pareto front")
    op = ">=" if evaluator.metric.higher_is_better else "<="
    ax.axhline(bound, ls="--", c="0.4", lw=1, label=f"bound: {evaluator.metric.name} {op} {bound:.4g}")
    for r in records:
        s = r["schedule"]
        if len(set(s.cond + s.uncond)) == 1 and s.num_steps == evaluator.reference.num_steps:
            ax.annotate("static native" if s.cond[0] == evaluator.native else "static weak", (r["fraction"], r["quality"]))
    ax.set_xlabel("FLOPs / static native")
    ax.set_ylabel(f"{evaluator.metric.name} (search seeds)")
    ax.set_yscale("log" if evaluator.metric.name.startswith("fid") else "linear")
    ax.legend(fontsize=8)
    _save_fig(fig, path)
    plt.close(fig)


def plot_schedule(schedule: Schedule, path: Path) -> None:
    """The schedule step by step: patch size per branch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.5))
    steps = range(schedule.num_steps)
    ax.step(steps, schedule.cond, where="mid", label="conditional")
    ax.step(steps, [p + 0.08 for p in schedule.uncond], where="mid", label="unconditional", linestyle="--")
    ax.set_xlabel("step (0 = pure noise)")
    ax.set_ylabel("patch size")
    ax.set_title(f"{schedule.num_steps} {schedule.solver} steps, guidance {schedule.guidance_scale} ({schedule.guidance_mode})")
    ax.legend(fontsize=8)
    _save_fig(fig, path)
    plt.close(fig)
