"""Pictures of a search and its samples: quality against FLOPs, a schedule step by step, sample grids."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from ..models.layers import size_key
from ..sampling.schedule import Schedule
from .evaluate import Evaluator


def save_grid(images: Any, path: Path, nrow: int = 8, min_side: int = 64, frame_ms: int = 125) -> None:
    """Save images in [-1, 1] (N, C, H, W) as one PNG grid, nrow to a row, with a 1-pixel border, or videos
    (N, C, T, H, W) as an animated GIF of such grids, one per frame (frame_ms each, looping); small images are
    enlarged by an integer factor (nearest neighbour) to at least min_side pixels, to be seen."""
    buf = io.BytesIO()
    if images.dim() == 5:
        frames = [_grid(images[:, :, t], nrow, min_side) for t in range(images.shape[2])]
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    else:
        _grid(images, nrow, min_side).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _grid(images: Any, nrow: int, min_side: int) -> Any:
    """The PIL image of save_grid's grid of (N, C, H, W) images."""
    import numpy as np
    import torch
    from PIL import Image

    scale = max(1, -(-min_side // images.shape[-1]))
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.zeros((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), dtype=np.uint8)
    pix = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = pix[i]
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _reference(evaluator: Evaluator) -> str:
    r = evaluator.reference
    return f"static native: {r.num_steps} {r.solver} steps, CFG {r.guidance_scale:g}"


def plot_tradeoff(records: list[dict[str, Any]], front: list[dict[str, Any]], evaluator: Evaluator, bound: float,
                  best: dict[str, Any], title: str, path: Path) -> None:
    """Quality against FLOPs: all trials, the Pareto front of the schedules meeting the bound, the bound,
    the threshold family, static native and weak, the native baseline, and the chosen schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stopped, style in ((False, {"s": 10, "c": "0.7", "label": "trials"}),
                           (True, {"s": 14, "c": "0.7", "marker": "x", "label": "stopped early (fewer samples)"})):
        pts = [r for r in records if bool(r["stopped"]) == stopped]
        if pts:
            ax.scatter([r["fraction"] for r in pts], [r["quality"] for r in pts], **style)
    fam = sorted((r for r in records if r["family"] == "threshold"), key=lambda r: r["fraction"])
    ax.plot([r["fraction"] for r in fam], [r["quality"] for r in fam], "o-", c="tab:blue", label="weak first k (paper)")
    ax.plot([r["fraction"] for r in front], [r["quality"] for r in front], "s-", c="tab:red", label="Pareto front")
    for r in (r for r in records if r["family"] == "native_baseline"):
        s = r["schedule"]
        ax.plot([r["fraction"]], [r["quality"]], "D", c="tab:green",
                label=f"native baseline: {s.num_steps} steps, CFG {s.guidance_scale:g}")
    hib = evaluator.metric.higher_is_better
    ax.axhline(bound, ls="--", c="0.4", lw=1, label=f"bound: {evaluator.metric.name} {'>=' if hib else '<='} {bound:.4g}")
    ax.plot([best["fraction"]], [best["quality"]], "*", ms=16, c="gold", mec="k", zorder=5,
            label=f"chosen: {best['fraction']:.3f} of the FLOPs")
    for r in records:
        s = r["schedule"]
        if len(set(s.cond + s.uncond)) == 1 and s.num_steps == evaluator.reference.num_steps:
            ax.annotate("static native" if s.cond[0] == evaluator.native else "static weak", (r["fraction"], r["quality"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"FLOPs per sample, fraction of {_reference(evaluator)}")
    ax.set_ylabel(f"{evaluator.metric.name} on the search seeds ({'higher' if hib else 'lower'} is better)")
    positive = all(r["quality"] > 0 for r in records)  # fid_native of static native is 0: no log axis then
    ax.set_yscale("log" if evaluator.metric.name.startswith("fid") and positive else "linear")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_fig(fig, path)
    plt.close(fig)


def plot_schedule(schedule: Schedule, fraction: float, path: Path) -> None:
    """The schedule step by step: the patch size of each branch at each denoising step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8))
    edges = range(schedule.num_steps + 1)  # step i spans [i, i + 1)
    sizes = sorted(set(schedule.cond + schedule.uncond))  # one level each: image sides or (t, h, w) video patches
    ax.stairs([sizes.index(p) for p in schedule.cond], edges, lw=2, baseline=None, label="conditional branch")
    if schedule.uses_cfg:
        ax.stairs([sizes.index(p) for p in schedule.uncond], edges, lw=2, ls="--", baseline=None,
                  label="unconditional branch")
    ax.set_xlabel("denoising step (0 = pure noise)")
    ax.set_ylabel("patch size (input pixels)")
    ax.set_xticks(range(schedule.num_steps + 1) if schedule.num_steps <= 25 else
                  range(0, schedule.num_steps + 1, 5))
    ax.set_yticks(range(len(sizes)), [size_key(p) for p in sizes])
    ax.set_ylim(-0.5, len(sizes) - 0.5)
    ax.set_title(f"{schedule.num_steps} {schedule.solver} steps, CFG {schedule.guidance_scale:g} "
                 f"({schedule.guidance_mode}): {fraction:.3f} of the static native FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_fig(fig, path)
    plt.close(fig)
