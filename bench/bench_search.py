"""Search benchmarks on the embedded default (issue 4).

    python bench/bench_search.py default      # (a) + (c) + (d): the default search vs the baselines
    python bench/bench_search.py samplers     # (b): brute-force optimum vs TPE / GP / NSGA-II / random
    python bench/bench_search.py fidelity     # the default search with and without multi-fidelity (issue 15)

(a) FLOPs saving of the exported schedule against the best "weak for the first k steps" schedule and
    the cheapest static native schedule at any step count (at the reference guidance scale, and at
    any guidance scale of the space), all under the default constraint, all confirmed on held-out seeds.
(c) model calls saved by prefix reuse. (d) wall time and peak memory of `flexisearch search` with
    no arguments (a fresh study).
(b) on `per_step` over 10 steps x 2 sizes (1,024 schedules): the constrained optimum found by brute
    force, and after how many trials and model calls each sampler first reaches it, with and without
    multi-fidelity (quality is memoised per schedule, so every sampler sees the same numbers; model
    calls are counted as a fresh run's prefix cache would spend them).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna

from flexisearch.optimize.config import load_search_config, space_path
from flexisearch.optimize.evaluate import Evaluator
from flexisearch.optimize.study import make_sampler
from flexisearch.sampling.schedule import Schedule


def fresh_search(study: str, *settings: str) -> tuple[dict, float, float]:
    """`flexisearch search` of the default space on a fresh study: (best.json, wall s, peak RSS GB)."""
    shutil.rmtree(Path("runs") / study, ignore_errors=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "flexisearch.cli", "search", "--study", study, "--quiet",
                           *(a for kv in settings for a in ("--set", kv))], capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        sys.exit(proc.stderr)
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return json.loads((Path("runs") / study / "best.json").read_text()), wall, peak_gb


def _ci(h: dict) -> str:
    return f"{h['value']:.4g} [{h['ci95'][0]:.4g}, {h['ci95'][1]:.4g}]"


def bench_fidelity(*only: str) -> None:
    """The default search from the same seed and space, scoring every trial on all search samples vs first on the
    default's fidelities (`only`: just those arms, e.g. `fidelity '[32, 128]'`)."""
    print(f"{'fidelities':<12} {'stopped':>7} {'stopped by':<30} {'model calls run':>15} {'saved by reuse':>14} {'wall s':>6} "
          f"{'best FLOPs':>10}  held-out metrics [95% CI]  schedule")
    for fidelities in [json.loads(a) for a in only] or ([], list(load_search_config(space_path(None), {}).fidelities)):
        best, wall, _ = fresh_search(f"bench-fidelity-{len(fidelities)}", f"fidelities={json.dumps(fidelities)}")
        p, s = best["provenance"], Schedule.from_dict(best["schedule"])
        held = ", ".join(f"{k} {_ci(v['heldout'])}" for k, v in best["qualities"].items())
        print(f"{str(p['fidelities']):<12} {p['trials_stopped_early']:>7} {json.dumps(p['trials_stopped_by']):<30} "
              f"{p['model_calls_run']:>15,} {p['model_calls_saved_by_prefix_reuse']:>14,} {wall:>6.0f} "
              f"{best['cost']['fraction_of_static_native']:>10.3f}  {held}  {s.num_steps} steps cfg {s.guidance_scale} "
              f"{s.guidance_mode}: {s.describe()}", flush=True)


def bench_default() -> None:
    best, wall, peak_gb = fresh_search("bench-default")
    cfg = load_search_config(space_path(None), {"study": "bench-default"})
    evaluator = Evaluator(cfg)
    bounds = {c["metric"]: c["bound"] for c in best["constraint"]["constraints"]}

    def meets(s: Schedule) -> bool:  # every bound of the search, on the search seeds
        q = evaluator.qualities(s)
        return all(c.violation(q[c.name], bounds[c.name]) <= 0 for c in evaluator.constraints)

    ref = evaluator.reference
    kw = dict(guidance_scale=ref.guidance_scale, solver=ref.solver, model=evaluator.fingerprint)
    n = ref.num_steps
    # baseline 1: the paper's family at the reference settings, largest k meeting the same constraint
    family = [Schedule.weak_first(k, n, evaluator.weak, evaluator.native, **kw) for k in range(n + 1)]
    feasible = [s for s in family if meets(s)]
    best_k = min(feasible, key=lambda s: evaluator.cost(s)["fraction"])
    # baseline 2: static native at any step count (reference guidance); 3: also at any guidance scale of the space
    scales = sorted(set(cfg.space.guidance_scale.enumerate()) | {ref.guidance_scale})
    statics = {g: [Schedule.static(evaluator.native, m, **{**kw, "guidance_scale": g}) for m in range(1, n + 1)]
               for g in scales}

    def cheapest(schedules: list[Schedule]) -> Schedule:
        return min((s for s in schedules if meets(s)), key=lambda s: evaluator.cost(s)["fraction"])

    best_static = cheapest(statics[ref.guidance_scale])
    best_static_any = cheapest([s for g in scales for s in statics[g]])
    natives = {k: v["heldout"] for k, v in best["static_native"]["qualities"].items()}
    rows = [("searched (best.json)", Schedule.from_dict(best["schedule"]),
             {k: v["heldout"] for k, v in best["qualities"].items()})]
    rows += [("best weak-first-k", best_k, evaluator.confirm(best_k)),
             ("cheapest static native", best_static, evaluator.confirm(best_static)),
             ("... at any guidance", best_static_any, evaluator.confirm(best_static_any)),
             ("static native (reference)", ref, natives)]
    print(f"# default search: {' and '.join(f'{k} bound {v:.4g}' for k, v in bounds.items())} on {cfg.search_samples} "
          f"search seeds; held-out n={natives['fid']['n']}; 'in CI': inside the static native 95% interval or better")
    print(f"{'schedule':<26} {'FLOPs':>6} {'saving':>7} " + " ".join(f"{k + ' held-out [95% CI]':>30} {'in CI':>5}"
                                                                   for k in natives) + "  description")
    for name, s, h in rows:
        frac = evaluator.cost(s)["fraction"]
        cells = []
        for c in evaluator.constraints:
            v, n = h[c.name], natives[c.name]
            inside = v["value"] >= n["ci95"][0] if c.metric.higher_is_better else v["value"] <= n["ci95"][1]
            cells.append(f"{v['value']:12.4f} [{v['ci95'][0]:7.4f}, {v['ci95'][1]:7.4f}] {'yes' if inside else 'no':>5}")
        print(f"{name:<26} {frac:6.3f} {100 * (1 - frac):6.1f}% " + " ".join(cells) +
              f"  {s.num_steps} steps cfg {s.guidance_scale} {s.guidance_mode}: {s.describe()}")
    p = best["provenance"]
    print(f"(c) model calls saved by prefix reuse: {p['model_calls_saved_by_prefix_reuse']} of "
          f"{p['model_calls_saved_by_prefix_reuse'] + p['model_calls_run']} "
          f"({100 * p['model_calls_saved_by_prefix_reuse'] / max(1, p['model_calls_saved_by_prefix_reuse'] + p['model_calls_run']):.1f}%)")
    print(f"(d) `flexisearch search` (fresh study, {p['n_trials']} trials): wall {wall:.0f} s, peak RSS {peak_gb:.2f} GB")


def _simulated_calls(runs: list[tuple[Schedule, int]], heads: tuple[int, ...]) -> list[int]:
    """Model calls each trial of a fresh run would spend, with the prefix cache of that run alone: trial t scored
    on its first n_t samples reuses, on each head segment of samples, the longest step prefix it shares with an
    earlier trial that sampled that segment (this bench memoises qualities across runs, so it counts calls here)."""
    out, bounds = [], [0, *heads]
    for t, (s, n) in enumerate(runs):
        calls = 0
        for lo, hi in zip(bounds, bounds[1:]):
            if lo >= n:
                break
            shared = max((_shared_calls(u, s) for u, m in runs[:t] if m > lo), default=0)
            calls += (min(hi, n) - lo) * (_calls(s) - shared)
        out.append(calls)
    return out


def _calls(s: Schedule, steps: int | None = None) -> int:
    """Model calls per sample of the schedule's first `steps` steps (all: None); a step whose branches share a
    size is one batched call."""
    return sum(1 if not s.uses_cfg or c == u else 2 for c, u in s.steps()[:steps])


def _shared_calls(a: Schedule, b: Schedule) -> int:
    """Calls per sample of b's steps that a's trajectory already holds: their common prefix, if they share settings."""
    if (a.num_steps, a.guidance_scale, a.guidance_mode, a.solver) != (b.num_steps, b.guidance_scale, b.guidance_mode, b.solver):
        return 0
    k = 0
    while k < b.num_steps and a.steps()[k] == b.steps()[k]:
        k += 1
    return _calls(b, k)


def bench_samplers(budget: int = 80, repeats: int = 3, steps: int = 10) -> None:
    """(b) with and without multi-fidelity: a per_step space small enough to enumerate, the constrained optimum by
    brute force, then each sampler's trials and model calls to first reach it."""
    cfg = load_search_config(space_path(None), {"study": "bench-samplers", "model": "embedded:flexidit-mnist16-lora",
                                    "space": {"type": "per_step", "num_steps": steps, "guidance_scale": 2.0,
                                              "guidance_mode": "cfg", "solver": "euler"},
                                    "reference": {"num_steps": steps, "guidance_scale": 2.0}, "batch_size": 32,
                                    "sampler": "bruteforce"})  # the default's bounds, search samples and fidelities
    evaluator = Evaluator(cfg)
    native = evaluator.qualities(evaluator.reference)
    bounds = evaluator.bounds(native)
    full, heads = cfg.search_samples, (*cfg.fidelities, cfg.search_samples)

    def objective(multi_fidelity: bool, scored: list[tuple[Schedule, int]], best: list[float]):
        def evaluate(trial: optuna.Trial) -> float:
            if multi_fidelity:
                r = evaluator.evaluate(trial, native, min(best, default=None))
                schedule, violations, n = r.schedule, r.violations, r.samples
                if r.pruned:  # costs at least the incumbent: nothing sampled (as in a search)
                    scored.append((schedule, 0))
                    raise optuna.TrialPruned()
            else:
                schedule = evaluator.space.suggest(trial)
                q = evaluator.qualities(schedule)
                violations, n = {c.name: c.violation(q[c.name], bounds[c.name]) for c in evaluator.constraints}, full
            for name, v in violations.items():
                trial.set_constraint(name, v)
            fraction = evaluator.cost(schedule)["fraction"]
            scored.append((schedule, n))
            if n == full and all(v <= 0 for v in violations.values()):
                best.append(fraction)
            return fraction
        return evaluate

    t0 = time.time()
    brute = optuna.create_study(sampler=make_sampler(cfg, evaluator.space))
    brute.optimize(objective(False, [], []), n_trials=2**steps)
    feasible = [t for t in brute.trials if all(v <= 0 for v in t.constraints.values())]
    optimum = min(t.values[0] for t in feasible)
    print(f"# per_step, {steps} Euler steps x 2 patch sizes = {2**steps} schedules, {full} search samples, "
          f"{' and '.join(f'{k} bound {v:.4g}' for k, v in bounds.items())}: brute force {time.time() - t0:.0f} s, "
          f"{len(feasible)} feasible, optimum FLOPs {optimum:.3f} "
          f"({sum(t.values[0] <= optimum + 1e-12 for t in feasible)} schedules share it); prefix reuse saved "
          f"{evaluator.cache.calls_saved} of {evaluator.cache.calls_saved + evaluator.cache.calls_run} model calls")
    print(f"# trials / model calls (thousands) to first reach the optimum, budget {budget} trials; multi-fidelity "
          f"{list(cfg.fidelities)} of {full}; '-': not reached (calls: of the whole budget)")
    print(f"{'sampler':<8} {'fidelity':<8} " + " ".join(f"{'seed ' + str(s):>14}" for s in range(repeats)) +
          f" {'mean calls':>10}")
    reference_run = [(evaluator.reference, full)]
    for name in ("tpe", "gp", "nsga2", "random"):
        for multi_fidelity in (False, True):
            cells, totals = [], []
            for seed in range(repeats):
                c = load_search_config(None, {"sampler": name, "seed": seed, "n_trials": budget})
                scored: list[tuple[Schedule, int]] = []
                study = optuna.create_study(sampler=make_sampler(c, evaluator.space))
                study.optimize(objective(multi_fidelity, scored, []), n_trials=budget)
                calls = _simulated_calls(reference_run + scored, heads)[1:]
                reached = [i for i, (t, (_, n)) in enumerate(zip(study.trials, scored)) if n == full and
                           all(v <= 0 for v in t.constraints.values()) and t.values[0] <= optimum + 1e-12]
                upto = reached[0] + 1 if reached else budget
                totals.append(sum(calls[:upto]))
                cells.append(f"{reached[0] + 1 if reached else '-':>4} / {totals[-1] / 1000:7.1f}k")
            print(f"{name:<8} {'multi' if multi_fidelity else 'one':<8} " + " ".join(f"{x:>14}" for x in cells) +
                  f" {sum(totals) / len(totals) / 1000:9.1f}k")


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    benches = {"default": bench_default, "fidelity": bench_fidelity, "samplers": bench_samplers}
    benches[sys.argv[1] if len(sys.argv) > 1 else "default"](*sys.argv[2:])
