"""What sampling costs on this machine: a measured cost table, and a schedule's predicted time and memory.

`profile` times, on the device and in the dtype it is given, the parts one batch of `sample` is made of:
one step of each CFG layout (both branches in one call at a shared patch size, or one call per branch at
different sizes; or the conditional branch alone when guidance is off), one solver step, and the set-up
(per-sample noise, timesteps). Each is warmed up, then timed as runs of consecutive calls, the parts taking
turns round after round (`_time_parts`); the table keeps medians and quartiles of the seconds per call, and
the peak memory of one step. A schedule's predicted time for a batch is the sum of its parts, so a
search can minimise seconds instead of FLOPs (`cost: latency`).

The table is JSON (schema flexisearch.cost_table, version 1), keyed by what its numbers depend on: the
model fingerprint, device name, dtype, torch version, compile mode and LoRA merging. A table whose key
differs from the run's is never used.
"""

from __future__ import annotations

import copy
import math
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import UserError
from ..files import atomic_write_json, read_json
from ..models.flexible import FlexibleDiT
from ..models.layers import Size
from .generate import (
    guided_output,
    initial_noise,
    make_scheduler,
    prepare_scheduler,
    uses_learned_variance,
)
from .schedule import Schedule

SCHEMA, VERSION = "flexisearch.cost_table", 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
_SOLVER_STEPS = 20  # a solver step is timed as the mean over a run of this many steps (multistep solvers)


def device_name(device: torch.device) -> str:
    """What the numbers depend on: the GPU's name, or the CPU's architecture and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} {torch.get_num_threads()} threads"


def table_key(model: FlexibleDiT, dtype: str, compile_mode: str) -> dict:
    """What a cost table's numbers depend on, for a model as it is now (its device, its LoRA merging)."""
    device = next(model.parameters()).device
    return {"model": model.fingerprint(), "device": device_name(device), "dtype": dtype, "torch": torch.__version__,
            "compile": compile_mode, "merge_lora": model.lora_merged}


@dataclass(frozen=True)
class Timing:
    """Seconds of one measured part: median and quartiles over the repeats."""

    median: float
    q25: float
    q75: float
    repeats: int

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        q = statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1 else [seconds[0]] * 3
        return cls(statistics.median(seconds), q[0], q[2], len(seconds))


@dataclass
class CostTable:
    """Measured parts of sampling, keyed by (cond size, uncond size or None without CFG, batch) for steps,
    (solver, batch) for solver steps and batch for the set-up; `peak_bytes` per step entry."""

    key: dict[str, Any]
    steps: dict[tuple[int, int | None, int], Timing] = field(default_factory=dict)
    peak_bytes: dict[tuple[int, int | None, int], int] = field(default_factory=dict)
    solvers: dict[tuple[str, int], Timing] = field(default_factory=dict)
    setup: dict[int, Timing] = field(default_factory=dict)

    def covers(self, patch_sizes: Iterable[int], solvers: Iterable[str], batch: int) -> bool:
        sizes = list(patch_sizes)
        return (batch in self.setup and all((s, batch) in self.solvers for s in solvers)
                and all((c, u, batch) in self.steps for c in sizes for u in [None, *sizes]))

    def batch_seconds(self, schedule: Schedule, batch: int) -> float:
        """Predicted wall time of `sample` for one batch of `batch` samples following the schedule."""
        self._need(schedule, batch)
        steps = sum(self.steps[self._step(c, u, schedule, batch)].median for c, u in schedule.steps())
        return self.setup[batch].median + steps + schedule.num_steps * self.solvers[(schedule.solver, batch)].median

    def schedule_peak_bytes(self, schedule: Schedule, batch: int) -> int:
        """Peak memory of the schedule's most demanding step, at this batch size."""
        self._need(schedule, batch)
        return max(self.peak_bytes[self._step(c, u, schedule, batch)] for c, u in schedule.steps())

    @staticmethod
    def _step(cond: int, uncond: int, schedule: Schedule, batch: int) -> tuple[int, int | None, int]:
        return cond, uncond if schedule.uses_cfg else None, batch

    def _need(self, schedule: Schedule, batch: int) -> None:
        if not self.covers(set(schedule.cond) | set(schedule.uncond), [schedule.solver], batch):
            raise UserError(f"cost table of {self.key['model']} has no entries for {schedule.describe()} with "
                            f"solver {schedule.solver} at batch {batch}: profile it (flexisearch profile)")

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def timing(t: Timing) -> dict[str, float]:
            return {"median_s": t.median, "q25_s": t.q25, "q75_s": t.q75, "repeats": t.repeats}
        return {"schema": SCHEMA, "version": VERSION, "key": self.key,
                "steps": [{"cond": c, "uncond": u, "batch": b, **timing(t), "peak_bytes": self.peak_bytes[(c, u, b)]}
                          for (c, u, b), t in sorted(self.steps.items(), key=lambda kv: str(kv[0]))],
                "solvers": [{"solver": s, "batch": b, **timing(t)} for (s, b), t in sorted(self.solvers.items())],
                "setup": [{"batch": b, **timing(t)} for b, t in sorted(self.setup.items())]}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        """Read a cost table; anything but a valid version-1 table is a one-line UserError naming the field."""
        d = read_json(path, "cost table")
        try:
            return cls._from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path}: not a flexisearch cost table ({_what(e)})") from None

    @classmethod
    def _from_dict(cls, d: Any) -> CostTable:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ValueError(f"field 'schema' is not {SCHEMA!r}")
        if d.get("version") != VERSION:
            raise ValueError(f"field 'version' is {d.get('version')!r}, expected {VERSION}")
        key = d["key"]
        missing = {"model", "device", "dtype", "torch", "compile", "merge_lora"} - set(key)
        if missing:
            raise ValueError(f"field 'key' lacks {sorted(missing)}")
        table = cls(dict(key))
        for e in d["steps"]:
            k = (_patch(e, "cond"), None if e["uncond"] is None else _patch(e, "uncond"), _size(e, "batch"))
            table.steps[k] = _timing(e, "steps")
            table.peak_bytes[k] = _count(e, "peak_bytes")
        for e in d["solvers"]:
            table.solvers[(str(e["solver"]), _size(e, "batch"))] = _timing(e, "solvers")
        for e in d["setup"]:
            table.setup[_size(e, "batch")] = _timing(e, "setup")
        return table


def _what(e: Exception) -> str:
    return f"missing field {e}" if isinstance(e, KeyError) else str(e)


def _size(entry: dict, name: str) -> int:
    v = entry[name]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"field '{name}' is {v!r}, expected a positive integer")
    return v


def _patch(entry: dict, name: str) -> Size:
    """A patch size: a positive integer, or a list of them (a video size, read back as a tuple)."""
    v = entry[name]
    if isinstance(v, list) and v and all(isinstance(q, int) and not isinstance(q, bool) and q > 0 for q in v):
        return tuple(v)
    if isinstance(v, list):
        raise ValueError(f"field '{name}' is {v!r}, expected a positive integer or a list of them")
    return _size(entry, name)


def _count(entry: dict, name: str) -> int:
    v = entry[name]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"field '{name}' is {v!r}, expected a non-negative integer")
    return v


def _timing(entry: dict, where: str) -> Timing:
    vals = [entry[k] for k in ("median_s", "q25_s", "q75_s")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf") for v in vals):
        raise ValueError(f"field '{where}' has times {vals}, expected finite non-negative seconds")
    return Timing(*(float(v) for v in vals), _size(entry, "repeats"))


# ---- measuring ----------------------------------------------------------------------------------------
class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages alive at once while it is active (CPU: torch keeps no such count)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage address -> [tensors referring to it, bytes]

    def _gone(self, ptr: int) -> None:
        ref = self._refs[ptr]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self._refs:
                    self._refs[ptr] = [0, t.untyped_storage().nbytes()]
                    self.live += self._refs[ptr][1]
                    self.peak = max(self.peak, self.live)
                self._refs[ptr][0] += 1
                weakref.finalize(t, self._gone, ptr)
        return out


def _peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Memory one call of fn allocates at its peak, beyond what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    mode = _LiveBytes()
    with mode:
        fn()
    return mode.peak


def _time_parts(parts: dict[Any, Callable[[], Any]], device: torch.device, warmup: int, repeats: int,
                unit_s: float = 0.05) -> dict[Any, Timing]:
    """Seconds per call of every part. The parts take turns, one run each per round, so that a drift of the
    machine's speed shifts them all alike. A run is one untimed call, then consecutive calls lasting about unit_s,
    timed: a sampling loop repeats a layout step after step, with caches and allocator warm for it (a call timed
    right after another part's is slower), and one short call alone is noisy."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run(fn: Callable[[], Any], calls: int) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - t0) / calls

    calls = {}
    for k, fn in parts.items():
        for _ in range(warmup):
            fn()
        calls[k] = max(1, math.ceil(unit_s / max(run(fn, 1), 1e-6)))
    seconds: dict[Any, list[float]] = {k: [] for k in parts}
    for _ in range(repeats):
        for k, fn in parts.items():
            seconds[k].append(run(fn, calls[k]))
    return {k: Timing.of(v) for k, v in seconds.items()}


def _solver_run(solver: str, model: FlexibleDiT, noise: torch.Tensor, gen: torch.Generator) -> Callable[[], None]:
    """A run of _SOLVER_STEPS solver steps (input scaling included) on a fixed model output."""
    cfg = model.config
    template = make_scheduler(solver, cfg.prediction, cfg.learn_sigma)
    channels = cfg.in_channels * (2 if cfg.learn_sigma and uses_learned_variance(template) else 1)
    out = torch.randn(noise.shape[0], channels, *noise.shape[2:], generator=gen).to(noise.device)

    def run() -> None:
        sched = copy.deepcopy(template)
        x = prepare_scheduler(sched, _SOLVER_STEPS, noise, noise.device)
        for t in sched.timesteps:
            if hasattr(sched, "scale_model_input"):
                sched.scale_model_input(x, t)
            x = sched.step(out, t, x).prev_sample
    return run


@torch.no_grad()
def profile(model: FlexibleDiT, batch_sizes: Iterable[int], solvers: Iterable[str], *, dtype: str = "float32",
            compile_mode: str = "none", warmup: int = 2, repeats: int = 7, guidance_scale: float = 2.0) -> CostTable:
    """Measure the cost table of a model as it is (its device, its LoRA merging): every patch size and CFG layout
    at each batch size, and each solver's step."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {list(DTYPES)}")
    if compile_mode not in COMPILE_MODES:
        raise UserError(f"--compile {compile_mode}: expected one of {list(COMPILE_MODES)}")
    device = next(model.parameters()).device
    model.eval()
    run_model = model if compile_mode == "none" else torch.compile(model, mode=None if compile_mode == "default"
                                                                   else compile_mode)
    cfg, sizes = model.config, model.config.patch_sizes
    table = CostTable(table_key(model, dtype, compile_mode))
    amp = torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype != "float32" else nullcontext()
    learned = cfg.learn_sigma  # the variance channels are computed at any rate; kept like DDPM keeps them
    for b in batch_sizes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, *cfg.sample_shape, generator=gen).to(device)
        y = (torch.arange(b) % max(1, model.null_class)).to(device)
        t = torch.tensor(500.0, device=device)
        steps: dict[tuple, Callable[[], Any]] = {}
        for c in sizes:
            for u in [None, *sizes]:
                s = Schedule(cond=(c,), uncond=(u or c,), guidance_scale=1.0 if u is None else guidance_scale,
                             solver="euler", model=table.key["model"])

                def step(s: Schedule = s, net: torch.nn.Module = run_model) -> torch.Tensor:
                    with amp:
                        return guided_output(net, x, t, y, s.cond[0], s.uncond[0], s, learned)
                steps[(c, u, b)] = step
                # a compiled model's memory is measured on the eager model (the dispatcher sees no compiled ops)
                table.peak_bytes[(c, u, b)] = _peak_bytes(lambda s=s: step(s, model), device)
        solver_runs = {(solver, b): _solver_run(solver, model, x, gen) for solver in sorted(set(solvers))}
        setup = {b: lambda: initial_noise(list(range(b)), tuple(x.shape[1:]))[0].to(device)}
        timed = _time_parts({**steps, **solver_runs, **setup}, device, warmup, repeats)
        table.steps.update({k: timed[k] for k in steps})
        for k in solver_runs:
            run = timed[k]
            table.solvers[k] = Timing(run.median / _SOLVER_STEPS, run.q25 / _SOLVER_STEPS, run.q75 / _SOLVER_STEPS,
                                      run.repeats)
        table.setup[b] = timed[b]
    return table


def cost_table(model: FlexibleDiT, batch: int, solvers: Iterable[str], *, given: str | None, own: Path,
               dtype: str = "float32", compile_mode: str = "none", repeats: int = 7) -> CostTable:
    """The table to predict sampling costs of `model` at `batch` with: `given` is used as it is (it may come from
    the device the schedules will run on) and must be of this model and cover its sizes and the solvers; else
    `own` if it was measured for this model, device and settings; else one measured now and saved as `own`."""
    solvers, sizes = sorted(set(solvers)), model.config.patch_sizes
    if given:
        table = CostTable.load(given)
        if table.key["model"] != model.fingerprint():
            raise UserError(f"cost.table {given}: measured for model {table.key['model']}, this model is "
                            f"{model.fingerprint()}")
        if not table.covers(sizes, solvers, batch):
            raise UserError(f"cost.table {given}: lacks batch {batch} or solvers {solvers} "
                            f"(profile them: flexisearch profile --batch {batch} --solver {' '.join(solvers)})")
        return table
    table = CostTable.load(own) if own.exists() else None
    if table is None or table.key != table_key(model, dtype, compile_mode) or not table.covers(sizes, solvers, batch):
        table = profile(model, [batch], solvers, dtype=dtype, compile_mode=compile_mode, repeats=repeats)
        own.parent.mkdir(parents=True, exist_ok=True)
        table.save(own)
    return table
