"""Training and evaluation of the tiny digit CLIP (metrics.tiny_clip) that scores the text-to-image default.

Symmetric InfoNCE on MNIST-5k train (16x16) and data.captions captions, with a learnable temperature.
Each caption keeps each of its three attributes with probability 1/2 (so "a seven" is in distribution
for zero-shot classification), images are shifted by up to one pixel, and captions that are identical
strings within a batch count as joint positives (many images share a caption).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.captions import DIGITS, attributes, caption_text
from ..data.captions import WORDS as ATTR_WORDS
from ..data.images import load_mnist
from ..files import atomic_write_json
from ..metrics.tiny_clip import (
    ASSET,
    build_tokenizer,
    clip_score_metric,
    load_clip,
    save_clip,
    tiny_clip_config,
    to_pixels,
    zero_shot,
)
from .loop import lr_at


@dataclass(frozen=True)
class CLIPTrainConfig:
    steps: int = 1200
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 100
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    projection_dim: int = 64
    attribute_keep: float = 0.5
    seed: int = 0


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift every image by -1, 0 or +1 pixel in each direction (background fill)."""
    n, _, s, _ = images.shape
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(n)])


def train_clip(config: CLIPTrainConfig, out_dir: str | Path) -> dict:
    """Train on MNIST-5k train, evaluate on the held-out split, save model + processor + model card."""
    from transformers import CLIPModel

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    images, labels = load_mnist(16, "train")
    attrs = attributes(images, labels)
    tok = build_tokenizer()
    model = CLIPModel(tiny_clip_config(len(tok), hidden=config.hidden, layers=config.layers, heads=config.heads,
                                       projection_dim=config.projection_dim))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    names = tuple(ATTR_WORDS)
    losses, t0, cpu0 = [], time.time(), time.process_time()
    for step in range(config.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, config.steps, config.lr, config.warmup)
        idx = torch.randint(len(images), (config.batch_size,), generator=gen)
        keep = torch.rand(config.batch_size, len(names), generator=gen) < config.attribute_keep
        caps = [caption_text(attrs[int(i)], tuple(n for n, k in zip(names, row) if k)) for i, row in zip(idx, keep)]
        tx = tok(caps, return_tensors="pt", padding=True)
        out = model(input_ids=tx["input_ids"], attention_mask=tx["attention_mask"],
                    pixel_values=_augment(images[idx], gen))
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # temperature at most 100, as in CLIP
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            print(json.dumps({"step": step + 1, "loss": round(sum(losses[-250:]) / 250, 4),
                              "elapsed_s": round(time.time() - t0, 1)}), flush=True)
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    model.eval()
    out_dir = Path(out_dir)
    save_clip(model, out_dir)
    card = evaluate_clip(out_dir)
    card.update({"train": {"config": dataclasses.asdict(config), "data": "MNIST-5k train split (4,000 images, 16x16)",
                           "steps": config.steps, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                           "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4),
                           "threads": torch.get_num_threads(),
                           "command": f"OMP_NUM_THREADS=1 python scripts/build_assets.py clip-train --out {out_dir} "
                                      f"--steps {config.steps}"},
                 "parameters": sum(p.numel() for p in model.parameters())})
    atomic_write_json(out_dir / "model_card.json", card)
    return card


def evaluate_clip(path: str | Path = ASSET, seed: int = 0) -> dict:
    """Zero-shot digit accuracy ('a <digit>') and attribute accuracy on the held-out split, and the CLIP
    score (torchmetrics CLIPScore) of real image-caption pairs against the same pairs shuffled."""
    model, processor = load_clip(path)
    images, labels = load_mnist(16, "heldout")
    attrs = attributes(images, labels)
    pred = zero_shot(model, processor, images, [f"a {d}" for d in DIGITS])
    result = {"eval_data": "MNIST-5k held-out split (1,000 images, 100 per digit), never seen in training",
              "zero_shot_digit_accuracy": round((pred == labels).double().mean().item(), 4),
              "zero_shot_prompts": "a zero ... a nine"}
    attr_acc = {}
    for name, words in ATTR_WORDS.items():
        hits = 0
        for d in range(10):
            sel = (labels == d).nonzero().flatten()
            texts = [caption_text({"digit": DIGITS[d], name: w}, (name,)) for w in words]
            p = zero_shot(model, processor, images[sel], texts)
            hits += sum(words[int(k)] == attrs[int(i)][name] for k, i in zip(p, sel))
        attr_acc[name] = round(hits / len(labels), 4)
    result["zero_shot_attribute_accuracy"] = {**attr_acc, "chance": 0.3333,
                                              "prompts": "a <word> <digit>, among the 3 words of the attribute"}
    captions = [caption_text(a) for a in attrs]
    perm = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [captions[i] for i in perm]
    scores = {}
    for key, caps in (("real", captions), ("shuffled", shuffled)):
        metric = clip_score_metric(path)
        metric.update(list(to_pixels(images)), caps)
        scores[key] = round(float(metric.compute()), 3)
    same_digit = sum(labels[i] == labels[j] for j, i in enumerate(perm)) / len(perm)
    result["clip_score"] = {**scores, "shuffled_pairs_same_digit_fraction": round(float(same_digit), 4),
                            "definition": "torchmetrics CLIPScore = max(mean 100 * cos(image, caption), 0)"}
    return result
