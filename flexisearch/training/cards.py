"""Model cards measured on generated samples: CLIP score against FLOPs for the text-to-image default."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data.captions import DIGITS, digit_of
from ..metrics.clip import DEFAULT_CLIP, CLIPMetric
from ..metrics.tiny_clip import zero_shot
from ..models import flops
from ..models.text_dit import FlexiTextDiT
from ..optimize.sample_sets import text_sample_sets
from ..sampling.generate import sample
from ..sampling.schedule import Schedule


def model_card(model_dir: str | Path, n_per_prompt: int = 10, steps: int = 20, guidance: float = 2.0,
               clip: str | Path = DEFAULT_CLIP) -> dict:
    """CLIP score on the held-out prompts (seeds from 1,000,000) of static native, static weak and the
    paper's threshold family (weak for the first k of `steps` Euler steps, both CFG branches), plus the
    weak-unconditional-only schedule, with FLOPs fractions and the CLIP model's zero-shot digit
    accuracy on the generated images (does the image show the prompted digit?)."""
    model = FlexiTextDiT.from_pretrained(model_dir)
    mc = model.config
    native, weak = mc.patch_size, max(mc.extra_patch_sizes)
    rows = model.prompt_rows("heldout")
    _, held = text_sample_sets(model, 1, n_per_prompt * len(rows))
    metric = CLIPMetric(model, clip)
    fp = model.fingerprint()
    common = dict(guidance_scale=guidance, solver="euler", model=fp)
    schedules = {"static native": Schedule.static(native, steps, **common),
                 "static weak": Schedule.static(weak, steps, **common)}
    for k in (4, 8, 10, 12, 14, 16):
        schedules[f"weak first {k}/{steps}"] = Schedule.weak_first(k, steps, weak, native, **common)
    schedules[f"uncond weak, cond native ({steps}/{steps})"] = Schedule.branch_split(0, steps, steps, weak, native, **common)
    ref_macs = flops.schedule_macs(mc, schedules["static native"])
    digits = torch.tensor([digit_of(model.captions[y]) for y in held.labels])
    out = []
    for name, sched in schedules.items():
        t0 = time.time()
        images = sample(model, sched, list(held.labels), list(held.seeds), batch_size=len(held.labels))
        wall = time.time() - t0
        value, low, high = metric.score_with_ci(images, held, None, n_boot=200, seed=0)
        acc = (zero_shot(*metric._pair, images, [f"a {d}" for d in DIGITS]) == digits).double().mean().item()
        out.append({"schedule": name, "clip": round(value, 3), "ci95": [round(low, 3), round(high, 3)],
                    "digit_accuracy": round(acc, 4), "flops_fraction": round(flops.schedule_macs(mc, sched) / ref_macs, 4),
                    "sampling_wall_s": round(wall, 2)})
    return {"model": str(model_dir), "fingerprint": fp, "eval": {
        "prompts": f"{len(rows)} held-out prompt rows x {n_per_prompt} seeds = {len(held.labels)} samples",
        "seeds": [held.seeds[0], held.seeds[-1]], "solver": f"euler, {steps} steps, CFG {guidance}",
        "clip_model": str(clip), "macs_static_native_per_sample": ref_macs,
        "macs_per_forward": {str(p): flops.forward_macs(mc, p) for p in mc.patch_sizes}}, "results": out}
