"""Command line: a thin layer over the library. Bad input ends with one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import UserError


def _overrides(args: argparse.Namespace) -> dict:
    """Config overrides: every --set KEY=VALUE (dotted keys into mappings), then the dedicated flags."""
    out: dict = {}
    for key, value in args.set or []:
        *parents, leaf = key.split(".")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return {**out, **{k: v for k in ("study", "n_trials", "sampler", "storage", "objective", "warm_start")
                      if (v := getattr(args, k, None)) is not None}}


def _setting(text: str) -> tuple[str, object]:
    """--set KEY=VALUE: VALUE is read as YAML (3, 2.5, [4, 8], null, euler)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key or any(not k for k in key.split(".")):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. space.num_steps=[4,8])")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML") from None


def cmd_search(args: argparse.Namespace) -> None:
    from .optimize.run import search

    if args.worker:  # started by `search --workers N`: the config is the study's own
        from .optimize.evaluate import Evaluator
        from .optimize.optuna_backend import run_worker
        from .optimize.study import stored_config

        cfg = stored_config(args.storage, args.study)
        if cfg is None:
            raise UserError(f"--worker: no study '{args.study}' with a stored config in {args.storage}")
        try:
            run_worker(cfg, Evaluator(cfg, args.device), progress=False)
        except KeyboardInterrupt:  # the process that started this one says it
            raise SystemExit(130) from None
        return
    result = search(args.space, device=args.device, backend=args.backend, workers=args.workers,
                    address=args.address, progress=not args.quiet, add_trials=args.add_trials, **_overrides(args))
    if not result.searched:
        from .optimize.config import run_dir

        print(f"study '{result.config.study}' already holds its {result.config.n_trials} complete trials: nothing to "
              f"run (--add-trials N searches more, `flexisearch export` re-scores; {run_dir(result.config)}/best.json)")
        return
    _report(result)


def cmd_export(args: argparse.Namespace) -> None:
    from .optimize.run import export

    _report(export(args.space, device=args.device, progress=not args.quiet, **_overrides(args)))


def _digest(doc: Any) -> dict:
    """What `show` tells about a best.json, a pareto.json or a schedule, as data (--json) and for _lines."""
    def entry(p: dict) -> dict:
        return {"description": _describe(p["schedule"]), "schedule": p["schedule"],
                "fraction_of_static_native": p["cost"]["fraction_of_static_native"], "saving": p["cost"]["saving"],
                "latency": p["cost"].get("latency"), "quality": p["quality"],  # no latency: older result files
                "qualities": p.get("qualities") or {p["quality"]["metric"]: p["quality"]}}  # older: one metric

    def reference(d: dict) -> dict:  # the static native schedule every FLOPs fraction is relative to
        r = d["static_native"]["schedule"]
        return {"num_steps": r["num_steps"], "guidance_scale": r["guidance_scale"]}

    if isinstance(doc, dict) and "points" in doc:
        return {"kind": "pareto", "metric": doc["metric"], "reference": reference(doc),
                "points": [entry(p) for p in doc["points"]]}
    if isinstance(doc, dict) and "static_native" in doc:
        native = doc["static_native"]
        return {"kind": "best", **entry(doc), "reference": reference(doc),
                "bounds": {c["metric"]: c["bound"] for c in doc["constraint"].get("constraints", [doc["constraint"]])},
                "static_native_heldout": {k: v["heldout"] for k, v in
                                          (native.get("qualities") or {native["quality"]["metric"]: native["quality"]}).items()},
                "model_calls_saved_by_prefix_reuse": doc["provenance"]["model_calls_saved_by_prefix_reuse"]}
    return {"kind": "schedule", "description": _describe(doc), "schedule": doc}


def _lines(d: dict) -> list[str]:
    if d["kind"] == "schedule":
        return [d["description"]]
    ref = f"static native, {d['reference']['num_steps']} steps, CFG {d['reference']['guidance_scale']:g}"
    if d["kind"] == "pareto":
        lines = [f"{'FLOPs':>7}  {'saving':>7}  {'latency':>7}  {d['metric'] + ' held-out':>22}  schedule   "
                 f"(FLOPs, latency: fractions of {ref})"]
        for p in d["points"]:
            h, lat = p["quality"]["heldout"], p["latency"]
            lines.append(f"{p['fraction_of_static_native']:7.3f}  {100 * p['saving']:6.1f}%  "
                         f"{lat['fraction_of_static_native'] if lat else float('nan'):7.3f}  "
                         f"{h['value']:8.3f} [{h['ci95'][0]:.2f},{h['ci95'][1]:.2f}]  {p['description']}")
        return lines
    rows = [("schedule", d["description"]),
            ("FLOPs", f"{d['fraction_of_static_native']:.3f} of {ref}  (saving {100 * d['saving']:.1f}%)"),
            *([("latency (predicted)", _latency_line(d["latency"]))] if d["latency"] else [])]
    for name, q in d["qualities"].items():
        h, native = q["heldout"], d["static_native_heldout"][name]
        rows += [(f"{name} held-out", f"{h['value']:.3f}  [{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}]  n={h['n']}"),
                 (f"{name} static native", f"{native['value']:.3f}  [{native['ci95'][0]:.3f}, {native['ci95'][1]:.3f}]"),
                 (f"{name} search seeds", f"{q['search']:.3f}  (bound {d['bounds'][name]:.3f})")]
        if "vs_static_native" in h:  # paired: the same held-out seeds
            v = h["vs_static_native"]
            rows.append((f"{name} minus static native", f"{v['difference']:+.3f}  [{v['ci95'][0]:+.3f}, "
                                                         f"{v['ci95'][1]:+.3f}]  same held-out seeds"))
    rows.append(("model calls saved by prefix reuse", str(d["model_calls_saved_by_prefix_reuse"])))
    width = max(len(r[0]) for r in rows)
    return [*(f"{k:<{width}}  {v}" for k, v in rows), f"FLOPs saving: {100 * d['saving']:.1f}%"]


def _latency_line(lat: dict) -> str:
    return (f"{1e3 * lat['seconds_per_image']:.3g} ms per image at batch {lat['batch_size']} "
            f"({lat['fraction_of_static_native']:.3f} of static native), peak {lat['peak_bytes'] / 2**20:.1f} MiB, "
            f"{lat['device']}, {lat['dtype']}")


def _report(result: Any) -> None:
    """What search and export print: the best schedule's summary and where its files are."""
    from .optimize.config import run_dir

    print("\n".join([*_lines(_digest(result.best)), f"best.json: {run_dir(result.config) / 'best.json'}"]))


def _describe(d: dict) -> str:
    from .sampling.schedule import Schedule

    s = Schedule.from_dict(d)
    spacing = f" ({s.timestep_spacing} spacing)" if s.timestep_spacing else ""
    return f"{s.num_steps} {s.solver} steps{spacing}, cfg {s.guidance_scale} ({s.guidance_mode}): {s.describe()}"


def cmd_spaces(args: argparse.Namespace) -> None:
    from .optimize.config import SPACES_DIR, shipped_spaces

    spaces = shipped_spaces()
    width = max(map(len, spaces))
    for name, about in spaces.items():
        print(f"{name:<{width}}  {about}")
    print(f"(files in {SPACES_DIR}; `flexisearch search --space NAME`)")


def cmd_show(args: argparse.Namespace) -> None:
    import json

    from .files import read_json

    doc = read_json(args.path, "result file")
    try:
        digest = _digest(doc)
        text = json.dumps(digest, indent=1) if args.json else "\n".join(_lines(digest))
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise UserError(f"{args.path}: not a complete best.json, pareto.json or schedule ({type(e).__name__}: {e})") from None
    print(text)


def cmd_sample(args: argparse.Namespace) -> None:
    from .models.loading import load_model, resolve_device
    from .optimize.plots import save_grid
    from .sampling.generate import sample
    from .sampling.schedule import Schedule

    out = Path(args.out)
    schedule = Schedule.load(args.schedule, point=args.point)
    model = load_model(args.model, resolve_device(args.device))
    kind = ".gif" if len(model.config.sample_shape) == 4 else ".png"  # videos: an animated grid
    if out.is_dir() or out.suffix.lower() != kind:
        raise UserError(f"--out {args.out}: expected a {kind} file name")
    schedule.check_model(model.config, None if args.any_model else model.fingerprint(), args.schedule)
    num_classes = model.config.num_classes
    rows = args.label if args.label is not None else list(range(min(10, num_classes)))
    bad = [c for c in rows if not 0 <= c < num_classes]
    if bad or not rows:
        raise UserError(f"--label {bad[0] if bad else ''}: this model has classes 0 to {num_classes - 1}")
    labels = [c for c in rows for _ in range(args.n)]  # one row per class
    images = sample(model, schedule, labels, list(range(args.seed, args.seed + len(labels))), progress=not args.quiet)
    decode = getattr(model, "decode_images", None)  # latent models: pixels through their VAE
    save_grid(decode(images) if decode is not None else images, out, nrow=args.n)
    print(f"wrote {args.out} ({len(rows)} rows of {args.n}: classes {', '.join(map(str, rows))})")


def cmd_flops(args: argparse.Namespace) -> None:
    from .models import flops
    from .models.dit import PRESETS
    from .models.loading import load_model
    from .sampling.schedule import Schedule

    if args.preset:
        if args.preset not in PRESETS:
            raise UserError(f"--preset {args.preset!r}: expected one of {', '.join(PRESETS)}")
        import dataclasses

        config = PRESETS[args.preset]
        if args.input_size:
            config = dataclasses.replace(config, input_size=args.input_size)
        p = config.patch_size
        config = dataclasses.replace(config, extra_patch_sizes=tuple(q for q in (2 * p, 4 * p) if config.input_size % q == 0))
    else:
        config = load_model(args.model).config
    schedule = Schedule.load(args.schedule, point=args.point) if args.schedule else None
    if schedule is not None:  # refused before anything is printed
        schedule.check_model(config, None, args.schedule)
    macs = {p: flops.forward_macs(config, p) for p in config.patch_sizes}
    table = [{"patch": p, "tokens": flops.tokens(config, p), "macs": m, "vs_native": m / macs[config.patch_size]}
             for p, m in macs.items()]
    out: dict[str, Any] = {"per_forward": table}
    if schedule is not None:
        s = schedule
        ref = Schedule.static(config.patch_size, s.num_steps, guidance_scale=s.guidance_scale, solver=s.solver,
                              model=s.model)
        m = flops.schedule_macs(config, s)
        out["schedule"] = {"path": args.schedule, "macs_per_sample": m, "fraction": m / flops.schedule_macs(config, ref),
                           "reference": {"num_steps": s.num_steps, "guidance_scale": s.guidance_scale}}
    if args.json:
        import json

        print(json.dumps(out, indent=1))
        return
    print(f"{'patch':>5}  {'tokens':>6}  {'MACs':>10}  {'FLOPs':>10}  {'vs native':>9}")
    for r in table:
        print(f"{r['patch']:>5}  {r['tokens']:>6}  {flops.format_count(r['macs']):>10}  "
              f"{flops.format_count(2 * r['macs']):>10}  {r['vs_native']:9.3f}")
    if schedule is not None:
        d = out["schedule"]
        print(f"schedule {args.schedule}: {flops.format_count(d['macs_per_sample'])} MACs = "
              f"{flops.format_count(2 * d['macs_per_sample'])} FLOPs per sample, {d['fraction']:.3f} vs static native, "
              f"{schedule.num_steps} steps, CFG {schedule.guidance_scale:g}")


def cmd_profile(args: argparse.Namespace) -> None:
    from .models.loading import load_model, resolve_device
    from .sampling.latency import CostTable, profile

    out = Path(args.out)
    if out.is_dir() or out.suffix.lower() != ".json":
        raise UserError(f"--out {args.out}: expected a .json file name")
    model = load_model(args.model, resolve_device(args.device))
    if args.merge_lora:
        model.merge_lora()
    table: CostTable = profile(model, args.batch, args.solver, dtype=args.dtype, compile_mode=args.compile,
                               repeats=args.repeats)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.save(out)
    key = table.key
    print(f"# {args.model} ({key['model']}) on {key['device']}, {key['dtype']}, compile {key['compile']}, "
          f"merge_lora {key['merge_lora']}, torch {key['torch']}; median [q25, q75] of {args.repeats}")
    print(f"{'step (cond/uncond)':<19} {'batch':>5} {'ms':>9} {'q25-q75 ms':>15} {'peak MiB':>9}")
    for (c, u, b), t in sorted(table.steps.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1] or 0)):
        name = f"{c}/{u}" if u is not None else f"{c} (no CFG)"
        print(f"{name:<19} {b:>5} {1e3 * t.median:>9.2f} {f'{1e3 * t.q25:.2f}-{1e3 * t.q75:.2f}':>15} "
              f"{table.peak_bytes[(c, u, b)] / 2**20:>9.1f}")
    for (solver, b), t in sorted(table.solvers.items()):
        print(f"{'solver ' + solver:<19} {b:>5} {1e3 * t.median:>9.2f}")
    print(f"wrote {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    from .models.loading import resolve_device
    from .training.dit import BaseTrainConfig, FlexifyConfig, train_base, train_flexify
    from .training.loop import read_config

    if args.what == "base":
        cfg = read_config(BaseTrainConfig, args.config, {"steps": args.steps, "data": args.data, "seed": args.seed})
        train_base(cfg, args.out)
    elif args.what == "video-base":
        from .training.video_dit import VideoBaseTrainConfig, train_video_base

        train_video_base(read_config(VideoBaseTrainConfig, args.config, {"steps": args.steps, "seed": args.seed}),
                         args.out)
    else:
        cfg = read_config(FlexifyConfig, args.config, {"steps": args.steps, "data": args.data, "seed": args.seed,
                                                       "base": args.base, "mode": args.mode})
        if not cfg.base:
            raise UserError("flexify: --base (a pretrained model) is required")
        if args.backend == "ray":
            from .training.ray_train import train_flexify_ray

            train_flexify_ray(cfg, args.out, args.num_workers, args.gpus_per_worker, args.address,
                              cpus_per_worker=args.cpus_per_worker)
        else:
            train_flexify(cfg, args.out, resolve_device(args.device or "cpu"))
    print(f"wrote {Path(args.out) / 'model'}")


def cmd_convert(args: argparse.Namespace) -> None:
    from .sampling.stock import convert_pipeline

    pipe = convert_pipeline(args.src, args.dst, tuple(args.weak))
    print(f"wrote {args.dst} ({type(pipe).__name__}, weak patch sizes {args.weak}: untrained until flexified)")


class _Parser(argparse.ArgumentParser):
    """argparse with the project's convention for bad input: one line on stderr, exit 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:  # not a number, or more digits than Python converts
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return n


def build_parser() -> argparse.ArgumentParser:
    from .sampling.schedule import SOLVERS

    ap = _Parser(prog="flexisearch", description=__doc__)
    ap.add_argument("--version", action="version", version=f"flexisearch {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def study_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--space", help="a search config YAML, or the name of a shipped one (`flexisearch spaces`); "
                                       "default: default")
        p.add_argument("--study", help="study name (results in runs/<study>/)")
        p.add_argument("--storage", help="Optuna storage: a database URL (sqlite:///..., postgresql://...) or a journal "
                                         "file path (runs/x/journal.log); default sqlite:///runs/<study>/study.db")
        p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one, else cpu)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--objective", choices=["single", "multi"], help="single: least FLOPs within the bound; "
                                                                          "multi: the FLOPs-quality Pareto front")
        p.add_argument("--set", type=_setting, action="append", metavar="KEY=VALUE",
                       help="override any config key, e.g. --set metric.relative=0.1 --set space.solver=ddim")

    p = sub.add_parser("search", help="search schedules (the main job); resumes an existing study")
    study_args(p)
    p.add_argument("--n-trials", type=_positive,
                   help="trials the study should hold, complete or pruned (a rerun runs the missing ones; a complete "
                        "study is left as it is)")
    p.add_argument("--add-trials", type=_positive, default=0, metavar="N", help="run N trials more than the study holds")
    p.add_argument("--sampler", choices=["tpe", "nsga2", "gp", "random", "bruteforce"], help="Optuna sampler (default tpe)")
    p.add_argument("--warm-start", metavar="SOURCE", help="try first the schedules of another search: its best.json, "
                   "pareto.json or exported study name (resampled to this space's step counts)")
    p.add_argument("--workers", type=_positive, default=1,
                   help="processes on this machine sharing the storage (default 1)")
    p.add_argument("--backend", choices=["optuna", "ray"], default="optuna", help="optuna (default): processes on this "
                   "machine; ray: trials on a Ray cluster")
    p.add_argument("--address", help="Ray cluster address (auto or HOST:PORT); default: a local cluster")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("export", help="re-score and export best.json / pareto.json of an existing study")
    study_args(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("spaces", help="list the shipped search configs (use one with --space NAME)")
    p.set_defaults(fn=cmd_spaces)

    p = sub.add_parser("show", help="print a best.json, pareto.json or schedule file")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("sample", help="sample a grid with a schedule and save a PNG")
    p.add_argument("--schedule", required=True, help="a schedule file, best.json, or pareto.json with --point")
    p.add_argument("--point", type=int, help="the Pareto point of a pareto.json (0: the cheapest)")
    p.add_argument("--model", default="embedded:flexidit-mnist16-lora",
                   help="embedded:NAME, a model or pipeline directory, dit:HUB_ID or pixart:HUB_ID (default: the embedded model)")
    p.add_argument("--n", type=_positive, default=8, help="images per class: one grid row each (default 8)")
    p.add_argument("--label", type=int, nargs="+", help="the classes, one row each (default: the first 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i (row by row) uses seed + i")
    p.add_argument("--out", default="runs/samples.png", help="PNG file to write; an animated GIF for video models "
                   "(default runs/samples.png)")
    p.add_argument("--any-model", action="store_true", help="accept a schedule made for another model")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("flops", help="per-patch-size cost of a preset or model, and of a schedule")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", help="e.g. DiT-XL/2")
    g.add_argument("--model", default="embedded:flexidit-mnist16-lora",
                   help="embedded:NAME, a model or pipeline directory, dit:HUB_ID or pixart:HUB_ID (default: the embedded model)")
    p.add_argument("--input-size", type=_positive, help="latent side for a preset (default 32 = 256 px)")
    p.add_argument("--schedule", help="also the cost of this schedule file, best.json, or pareto.json with --point")
    p.add_argument("--point", type=int, help="the Pareto point of a pareto.json (0: the cheapest)")
    p.add_argument("--json", action="store_true", help="as JSON (MACs; FLOPs = 2 x MACs)")
    p.set_defaults(fn=cmd_flops)

    p = sub.add_parser("profile", help="measure sampling latency and memory per patch size: a cost table for "
                                       "`cost: latency` searches")
    p.add_argument("--model", default="embedded:flexidit-mnist16-lora",
                   help="embedded:NAME, a model or pipeline directory, dit:HUB_ID or pixart:HUB_ID (default: the embedded model)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one, else cpu)")
    p.add_argument("--batch", type=_positive, nargs="+", default=[1, 64], help="batch sizes (default: 1 64)")
    p.add_argument("--solver", nargs="+", default=["euler"], choices=sorted({s for v in SOLVERS.values() for s in v}),
                   help="solvers whose step to time (default: euler)")
    p.add_argument("--dtype", default="float32", help="float32, or autocast to bfloat16 / float16 (default float32)")
    p.add_argument("--compile", default="none", help="torch.compile mode: none (default), default, reduce-overhead "
                                                    "(CUDA graphs) or max-autotune")
    p.add_argument("--merge-lora", action="store_true", help="merge LoRA into per-size weights for inference")
    p.add_argument("--repeats", type=_positive, default=7, help="timed repeats per entry, after 2 warm-ups (default 7)")
    p.add_argument("--out", default="runs/cost_table.json", help="JSON file to write (default runs/cost_table.json)")
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("train", help="pretrain a base DiT (video-base: a video DiT on moving digits) or flexify one")
    p.add_argument("what", choices=["base", "video-base", "flexify"])
    p.add_argument("--config", help="JSON config (fields of BaseTrainConfig / VideoBaseTrainConfig / FlexifyConfig)")
    p.add_argument("--out", required=True, help="run folder: the model is written to OUT/model, checkpoints beside it")
    p.add_argument("--base", help="flexify: the pretrained model: embedded:<name>, a FlexiDiT or pipeline directory "
                   "(flexisearch convert) or dit:<hub id or DiTPipeline directory>")
    p.add_argument("--mode", choices=["shared", "lora"], help="flexify: fine-tune the shared weights, or LoRA adapters "
                   "per weak patch size (default: the config's)")
    p.add_argument("--data", help="mnist, digits8, or an image folder with one subfolder per class (latent models: "
                   "any resolution, centre-cropped as DiT does and encoded once by the model's VAE; text-to-image: "
                   "images listed in captions.jsonl); moving-digits for video models")
    p.add_argument("--device", help="flexify: cpu (default), cuda or cuda:N (bf16 autocast on CUDA)")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="flexify: this process (default), or Ray Train workers (data parallel, one config for both)")
    p.add_argument("--num-workers", type=_positive, default=2, help="ray: workers (default 2); the config's "
                   "batch_size is the global batch, split evenly")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs per worker (default 0: CPU, gloo)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="ray: CPUs per worker, also its torch threads "
                   "(default 1)")
    p.add_argument("--address", help="ray: HOST:PORT or auto of a running cluster (default: start a local one)")
    p.add_argument("--steps", type=_positive, help="optimizer steps (default: the config's)")
    p.add_argument("--seed", type=int, help="random seed (default: the config's)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("convert", help="convert a diffusers DiTPipeline or PixArtAlphaPipeline directory into a "
                       "FlexiDiT pipeline directory")
    p.add_argument("src", help="DiTPipeline or PixArtAlphaPipeline directory (model_index.json and its components)")
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument("--weak", type=int, nargs="+", default=[4], help="weak patch sizes to add (default: 4)")
    p.set_defaults(fn=cmd_convert)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"flexisearch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexisearch: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
