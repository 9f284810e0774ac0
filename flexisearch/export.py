"""Export a finished study: held-out confirmation, best.json, pareto.json and plots.

The exported quality of every schedule is measured on held-out seeds (never used by the search)
with a bootstrap interval; the search-time value is kept beside it.
"""

from __future__ import annotations

import datetime
import io
from pathlib import Path
from typing import Any

import optuna

from . import __version__
from .errors import UserError, atomic_write_bytes, atomic_write_json
from .objective import Objective
from .schedule import Schedule
from .search import reference_quality, run_dir, storage_url, trial_records
from .space import SearchConfig


def pareto_front(records: list[dict[str, Any]], higher_is_better: bool) -> list[dict[str, Any]]:
    """Feasible-or-not non-dominated records in (FLOPs fraction, quality), cheapest first."""
    sign = -1.0 if higher_is_better else 1.0
    front, best = [], float("inf")
    for r in sorted(records, key=lambda r: (r["fraction"], sign * r["quality"])):
        if sign * r["quality"] < best:
            front.append(r)
            best = sign * r["quality"]
    return front


def best_record(records: list[dict[str, Any]], higher_is_better: bool) -> dict[str, Any] | None:
    """The cheapest feasible schedule (ties: better quality)."""
    sign = -1.0 if higher_is_better else 1.0
    feasible = [r for r in records if r["feasible"]]
    return min(feasible, key=lambda r: (r["fraction"], sign * r["quality"])) if feasible else None


def _entry(objective: Objective, r: dict[str, Any], heldout: dict[str, Any]) -> dict[str, Any]:
    cost = objective.cost(r["schedule"])
    return {"schedule": r["schedule"].to_dict(), "trial": r["number"], "family": r["family"],
            "cost": {"macs": cost["macs"], "flops": cost["flops"], "fraction_of_static_native": cost["fraction"],
                     "saving": 1 - cost["fraction"], "units": "MACs per sample; flops = 2 x macs"},
            "quality": {"metric": objective.metric.name, "heldout": heldout, "search": r["quality"]}}


def export_study(cfg: SearchConfig, objective: Objective, study: optuna.Study, progress: bool = False) -> dict[str, Any]:
    """Re-score the best schedule and the Pareto points on held-out seeds; write JSON and plots."""
    records = trial_records(study)
    if not records:
        raise UserError(f"study '{cfg.study}' in {storage_url(cfg)} has no completed trials")
    hib = objective.metric.higher_is_better
    best = best_record(records, hib)
    bound = float(study.user_attrs.get("bound", objective.threshold(reference_quality(study, objective))))
    if best is None:
        raise UserError(f"constraint {objective.metric.name} {'>=' if hib else '<='} {bound:.4g}: no schedule met it "
                        f"in {len(records)} trials (best {objective.metric.name}: "
                        f"{(max if hib else min)(r['quality'] for r in records):.4g})")
    out = run_dir(cfg)
    full_front = pareto_front([r for r in records if r["feasible"]] or records, hib)
    front = full_front[: cfg.pareto_max]
    confirmed: dict[int, dict[str, Any]] = {}
    for r in [best] + front:
        if r["number"] not in confirmed:
            confirmed[r["number"]] = objective.confirm(r["schedule"], progress=progress)
    native = objective.confirm(objective.reference, progress=progress)
    calls = [v for k, v in study.user_attrs.items() if k.startswith("calls_saved_worker_")]
    provenance = {"study": cfg.study, "storage": storage_url(cfg), "sampler": cfg.sampler, "objective": cfg.objective,
                  "space": cfg.space.type, "n_trials": len(records), "search_samples": cfg.search_samples,
                  "search_seeds": [0, cfg.search_samples - 1], "flexisearch": __version__,
                  "model_calls_saved_by_prefix_reuse": sum(c[0] for c in calls),
                  "model_calls_run": sum(c[1] for c in calls),
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    constraint = {"metric": objective.metric.name, "bound": bound, "relative": cfg.metric.relative,
                  "absolute": cfg.metric.max if cfg.metric.max is not None else cfg.metric.min,
                  "search_reference_quality": reference_quality(study, objective)}
    reference = {"schedule": objective.reference.to_dict(), "cost": {"macs": objective.reference_macs},
                 "quality": {"metric": objective.metric.name, "heldout": native}}
    best_doc = {**_entry(objective, best, confirmed[best["number"]]), "constraint": constraint, "model": objective.fingerprint,
                "model_spec": cfg.model, "static_native": reference, "provenance": provenance}
    pareto_doc = {"model": objective.fingerprint, "metric": objective.metric.name, "constraint": constraint,
                  "static_native": reference, "provenance": provenance,
                  "points": [_entry(objective, r, confirmed[r["number"]]) for r in front]}
    atomic_write_json(out / "best.json", best_doc)
    atomic_write_json(out / "pareto.json", pareto_doc)
    plot_tradeoff(records, full_front, objective, bound, out / "tradeoff.png")
    plot_schedule(best["schedule"], out / "schedule.png")
    return best_doc


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


def plot_tradeoff(records: list[dict[str, Any]], front: list[dict[str, Any]], objective: Objective, bound: float,
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
    op = ">=" if objective.metric.higher_is_better else "<="
    ax.axhline(bound, ls="--", c="0.4", lw=1, label=f"bound: {objective.metric.name} {op} {bound:.4g}")
    for r in records:
        s = r["schedule"]
        if len(set(s.cond + s.uncond)) == 1 and s.num_steps == objective.reference.num_steps:
            ax.annotate("static native" if s.cond[0] == objective.native else "static weak", (r["fraction"], r["quality"]))
    ax.set_xlabel("FLOPs / static native")
    ax.set_ylabel(f"{objective.metric.name} (search seeds)")
    ax.set_yscale("log" if objective.metric.name.startswith("fid") else "linear")
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
