"""Recipes for the class-conditional DiT: pretrain a static model (rectified flow), then flexify it.

Flexify supports both of the paper's recipes:
  shared: the whole model is fine-tuned with the diffusion loss, one patch size drawn per sample;
  lora:   the base is frozen; per-size LoRA, the patch-size embedding and the embed/de-embed
          residuals learn to match the frozen native prediction (distillation), so the native
          path stays bit-identical.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.images import load_dataset
from ..errors import UserError
from ..files import atomic_write_json
from ..models.dit import FlexiDiT, FlexiDiTConfig
from .loop import drop_labels, ema_copy, flow_pair, pretrain_flow, train_loop


@dataclass(frozen=True)
class BaseTrainConfig:
    """Pretraining of a static class-conditional DiT at its native patch size."""

    data: str = "mnist"
    image_size: int = 16
    hidden_size: int = 128
    depth: int = 5
    num_heads: int = 4
    patch_size: int = 2
    steps: int = 4000
    batch_size: int = 128
    lr: float = 6e-4
    warmup: int = 100
    class_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    ckpt_every: int = 200


@dataclass(frozen=True)
class FlexifyConfig:
    """Fine-tuning a pretrained DiT so that it also runs at the weak patch sizes."""

    base: str = ""
    data: str = "mnist"
    mode: str = "shared"  # "shared" or "lora"
    weak_patch_sizes: tuple[int, ...] = (4,)
    weak_prob: float = 0.5  # shared: chance that a sample trains at a weak size
    steps: int = 400  # 10% of the default pretraining
    batch_size: int = 128
    lr: float = 2e-4
    new_layer_lr_mult: float = 10.0
    residual_init_std: float = 0.02
    lora_rank: int = 32
    class_dropout: float = 0.1
    ema_decay: float = 0.99  # with warm-up; over a few hundred steps the warm-up (1+t)/(10+t) sets the decay
    seed: int = 0
    ckpt_every: int = 100


def train_base(config: BaseTrainConfig, out_dir: str | Path) -> FlexiDiT:
    """Pretrain a static class-conditional DiT with rectified flow; writes out_dir/model (EMA) and out_dir/raw."""
    out_dir = Path(out_dir)
    images, labels = load_dataset(config.data, config.image_size, "train")
    torch.manual_seed(config.seed)
    model = FlexiDiT(FlexiDiTConfig(
        input_size=config.image_size, in_channels=images.shape[1], hidden_size=config.hidden_size,
        depth=config.depth, num_heads=config.num_heads, patch_size=config.patch_size,
        num_classes=int(labels.max()) + 1, learn_sigma=False, prediction="flow"))
    return pretrain_flow("pretrain", out_dir, config, model, images, labels, config.class_dropout)


def train_flexify(config: FlexifyConfig, out_dir: str | Path) -> FlexiDiT:
    """Add the weak patch sizes to a pretrained model and fine-tune them (shared or lora); writes out_dir/model
    (EMA weights; with LoRA the frozen base is unchanged by the average) and out_dir/raw."""
    if config.mode not in ("shared", "lora"):
        raise UserError(f"flexify config: field 'mode' is {config.mode!r}, expected 'shared' or 'lora'")
    out_dir = Path(out_dir)
    base = FlexiDiT.from_pretrained(config.base)
    image_size = base.config.input_size
    images, labels = load_dataset(config.data, image_size, "train")
    if images.shape[1] != base.config.in_channels or int(labels.max()) >= base.config.num_classes:
        raise UserError(f"{config.base}: model (channels={base.config.in_channels}, classes={base.config.num_classes}) "
                        f"does not fit data '{config.data}'")
    for p in config.weak_patch_sizes:
        if image_size % p or p <= base.config.patch_size:
            raise UserError(f"flexify config: weak patch size {p} must divide {image_size} and exceed {base.config.patch_size}")
    torch.manual_seed(config.seed)
    lora = config.mode == "lora"
    model = base.with_patch_sizes(config.weak_patch_sizes, init_std=config.residual_init_std,
                                  lora_rank=config.lora_rank if lora else 0, lora_alpha=float(config.lora_rank))
    model.train()
    ema = ema_copy(model)
    new = [p for n, p in model.named_parameters() if "residual" in n or "patch_size_embed" in n or "lora_" in n]
    new_ids = {id(p) for p in new}
    old = [p for p in model.parameters() if id(p) not in new_ids]
    null = model.null_class
    native, weak = model.config.patch_size, config.weak_patch_sizes
    if lora:
        for p in old:
            p.requires_grad_(False)
        groups = [{"params": new, "lr_mult": 1.0}]
    else:
        groups = [{"params": old, "lr_mult": 1.0}, {"params": new, "lr_mult": config.new_layer_lr_mult}]

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(images), (config.batch_size,), generator=gen)
        xt, t, target = flow_pair(images[idx], gen)
        y = drop_labels(labels[idx], config.class_dropout, null, gen)
        if lora:
            p = weak[int(torch.randint(len(weak), (1,), generator=gen))]
            with torch.no_grad():
                teacher = model(xt, t, y, native)
            return ((model(xt, t, y, p) - teacher) ** 2).mean()
        # Shared weights: a patch size per sample, one forward per size present in the batch.
        sizes = torch.where(torch.rand(len(idx), generator=gen) < config.weak_prob,
                            torch.tensor(weak)[torch.randint(len(weak), (len(idx),), generator=gen)],
                            torch.full((len(idx),), native))
        loss = xt.new_zeros(())
        for p in sizes.unique().tolist():
            sel = sizes == p
            loss = loss + ((model(xt[sel], t[sel], y[sel], p) - target[sel]) ** 2).sum()
        return loss / target.numel()

    t0 = time.time()
    lr = config.lr if not lora else config.lr * config.new_layer_lr_mult
    train_loop(f"flexify-{config.mode}", out_dir, config, model, ema, groups, loss_fn, config.steps, lr, warmup=20)
    ema.eval().save_pretrained(out_dir / "model")
    model.eval().save_pretrained(out_dir / "raw")
    atomic_write_json(out_dir / "train_info.json", {"kind": "flexify", "config": dataclasses.asdict(config),
                                                    "wall_s_last_session": round(time.time() - t0, 1)})
    return ema
