"""The paper's family measured on a shipped model, for its model card (build_embedded.py, build_video.py) and
bench_recipes.py: static native on 3 seed sets (the noise band: mean + 2 std), and for each weak size static weak
and "weak for the first k steps" on the first seed set. Finished measurements are kept in <out>/eval.json.

Keys of the result: native_seedset{i}, weak@{size}, weak_first_{k}@{size} (size as models.layers.size_key).
"""

from __future__ import annotations

import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flexisearch.files import atomic_write_bytes, atomic_write_json
from flexisearch.models import flops
from flexisearch.models.flexible import FlexibleDiT
from flexisearch.models.layers import Size, size_key
from flexisearch.optimize.sample_sets import SampleSet
from flexisearch.sampling.generate import TrajectoryCache, sample
from flexisearch.sampling.schedule import Schedule

STEPS, CFG_SCALE, N = 20, 2.0, 1000
Measure = Callable[[torch.Tensor, torch.Tensor], dict]  # (samples, labels) -> {"fid": ..., more numbers}


def evaluate(model: FlexibleDiT, out: Path, measure: Measure, k_every: int = 1, n: int = N,
             weak_sizes: list[Size] | None = None) -> dict:
    """All the numbers of a model card (module docstring); `measure` scores samples, "fid" (lower is better)
    being the one the band is made of. weak_sizes default to all the model's extra sizes."""
    path = out / "eval.json"
    fp = model.fingerprint()
    res = json.loads(path.read_text()) if path.is_file() else {}
    if res.get("fingerprint") != fp or res.get("n") != n:  # results of another model or sample count: start over
        res = {"fingerprint": fp, "n": n}
    native = model.config.patch_size
    cache = TrajectoryCache(max_bytes=2 * 2**30)

    def run(schedule: Schedule, seed_base: int, key: str) -> None:
        if key in res:
            return
        s = SampleSet.balanced(key, n, model.config.num_classes, seed_base)
        t0 = time.time()
        samples = sample(model, schedule, list(s.labels), list(s.seeds), batch_size=64, cache=cache,
                         cache_tag=f"{seed_base}|{fp}")
        res[key] = {**measure(samples, torch.tensor(s.labels)), "seconds": round(time.time() - t0, 1),
                    "fraction": flops.schedule_macs(model.config, schedule) / ref_macs}
        atomic_write_json(path, res)
        print(key, res[key], flush=True)

    def schedule(cond: list[Size]) -> Schedule:
        return Schedule(cond=tuple(cond), uncond=tuple(cond), guidance_scale=CFG_SCALE, solver="euler", model=fp)

    ref_macs = flops.schedule_macs(model.config, schedule([native] * STEPS))
    for i in range(3):
        run(schedule([native] * STEPS), 10**6 * (i + 1), f"native_seedset{i}")
    for weak in weak_sizes if weak_sizes is not None else model.config.extra_patch_sizes:
        run(schedule([weak] * STEPS), 10**6, f"weak@{size_key(weak)}")
        for k in range(0, STEPS + 1, k_every):
            run(schedule([weak] * k + [native] * (STEPS - k)), 10**6, f"weak_first_{k}@{size_key(weak)}")
    return res


def band(res: dict, metric: str = "fid") -> tuple[list[float], float, float, float]:
    """(static native's values on the 3 seed sets, mean, std, mean + 2 std: the noise band's upper end)."""
    values = [res[f"native_seedset{i}"][metric] for i in range(3)]
    mean, std = statistics.mean(values), statistics.stdev(values)
    return values, mean, std, mean + 2 * std


def curve(res: dict, weak: Size) -> list[tuple[int, dict]]:
    """(k, measurements) of weak for the first k steps at this weak size, by k."""
    tag = f"@{size_key(weak)}"
    ks = sorted(int(key[len("weak_first_"):-len(tag)]) for key in res
                if key.startswith("weak_first_") and key.endswith(tag))
    return [(k, res[f"weak_first_{k}{tag}"]) for k in ks]


def largest_k_inside(res: dict, weak: Size) -> int | None:
    """The largest k whose FID is inside static native's noise band (None: no k, not even 0)."""
    limit = band(res)[3]
    return max((k for k, m in curve(res, weak) if m["fid"] <= limit), default=None)


def saved_inside(res: dict, weak: Size) -> tuple[int | None, float]:
    """(largest k inside the band, the percentage of FLOPs it saves; 0 when there is none)."""
    k = largest_k_inside(res, weak)
    return k, 100 * (1 - dict(curve(res, weak))[k]["fraction"]) if k is not None else 0.0


def family_rows(res: dict, weak: Size) -> str:
    """The markdown rows (k, FLOPs / native, saving, FID, inside band) of one weak size's family."""
    limit = band(res)[3]
    return "\n".join(f"| {k} | {m['fraction']:.3f} | {100 * (1 - m['fraction']):.1f}% | {m['fid']:.2f} | "
                     f"{'yes' if m['fid'] <= limit else 'no'} |" for k, m in curve(res, weak))


def plot_curve(res: dict, weak_sizes: list[Size], path: Path, title: str, ylabel: str,
               extra: list[tuple[str, float, float]] = ()) -> None:
    """Quality against FLOPs: one line per weak size's family, static native's band, and extra labelled points
    (name, FLOPs fraction, value), e.g. searched schedules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, mean, std, _ = band(res)
    fig, ax = plt.subplots(figsize=(6, 4))
    for weak in weak_sizes:
        points = curve(res, weak)
        ax.plot([m["fraction"] for _, m in points], [m["fid"] for _, m in points], "o-",
                label=f"weak {size_key(weak)} for the first k of {STEPS} steps")
        for k, m in points[::4]:
            ax.annotate(str(k), (m["fraction"], m["fid"]), fontsize=7)
    for name, fraction, value in extra:
        ax.plot([fraction], [value], "*", markersize=12, label=name)
    ax.axhspan(mean - 2 * std, mean + 2 * std, color="tab:green", alpha=0.2, label="static native, mean ± 2 std")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs / static native")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    plt.close(fig)
