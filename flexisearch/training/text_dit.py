"""Recipes for the embedded text-to-image default: pretrain a static FlexiTextDiT on MNIST-5k and its
measured captions, flexify it with LoRA distillation, and install the shipped prompt table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.captions import captions_for, prompt_table
from ..data.images import load_mnist
from ..errors import UserError
from ..models.text_dit import FlexiTextDiT, FlexiTextDiTConfig
from ..models.text_encoder import MINILM, MINILM_DIM, set_model_prompts
from .loop import drop_labels, pretrain, train_loop
from .objectives import distillation_loss, objective_for


@dataclass(frozen=True)
class TextBaseTrainConfig:
    """Pretraining of a static text-conditioned DiT on MNIST-5k train (16x16) and its measured captions."""

    image_size: int = 16
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    patch_size: int = 2
    text_len: int = 16
    steps: int = 1600
    batch_size: int = 64
    lr: float = 6e-4
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.998
    seed: int = 0
    ckpt_every: int = 100


@dataclass(frozen=True)
class TextFlexifyConfig:
    """LoRA distillation of the weak patch sizes (cross-attention frozen, native path untouched)."""

    base: str = ""
    weak_patch_sizes: tuple[int, ...] = (4,)
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    residual_init_std: float = 0.02
    lora_rank: int = 16
    caption_dropout: float = 0.1
    seed: int = 0
    ckpt_every: int = 100


def caption_data(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """MNIST-5k train images, each image's caption row, and the sorted unique training captions."""
    images, labels = load_mnist(image_size, "train")
    caps = captions_for(images, labels)
    unique = sorted(set(caps))
    index = {c: i for i, c in enumerate(unique)}
    return images, torch.tensor([index[c] for c in caps]), unique


def train_text_base(config: TextBaseTrainConfig, out_dir: str | Path) -> FlexiTextDiT:
    """Rectified-flow pretraining (as training.dit.train_base) with caption dropout to the empty caption.

    Writes out_dir/model (EMA) and out_dir/raw; their prompt table is the unique training captions."""
    out_dir = Path(out_dir)
    images, rows, unique = caption_data(config.image_size)
    torch.manual_seed(config.seed)
    cfg = FlexiTextDiTConfig(input_size=config.image_size, in_channels=1, hidden_size=config.hidden_size,
                             depth=config.depth, num_heads=config.num_heads, patch_size=config.patch_size,
                             num_classes=len(unique), learn_sigma=False, prediction="flow",
                             caption_channels=MINILM_DIM, text_len=config.text_len, text_encoder=MINILM)
    model = FlexiTextDiT(cfg)
    set_model_prompts(model, unique)
    return pretrain("text-pretrain", out_dir, config, model, images, rows, config.caption_dropout)


def train_text_flexify(config: TextFlexifyConfig, out_dir: str | Path) -> FlexiTextDiT:
    """Add the weak sizes with per-size LoRA on self-attention and MLP and distil them from the frozen
    native prediction, ||v(x_t; native) - v(x_t; weak)||^2; only LoRA, the patch-size embedding and the
    embed/de-embed residuals train, so the native path (and all cross-attention) stays bit-identical."""
    out_dir = Path(out_dir)
    base = FlexiTextDiT.from_pretrained(config.base)
    images, rows, unique = caption_data(base.config.input_size)
    if base.captions[:-1] != unique:
        raise UserError(f"{config.base}: prompt table is not the training captions; flexify the pretraining output")
    torch.manual_seed(config.seed)
    model = base.with_patch_sizes(config.weak_patch_sizes, init_std=config.residual_init_std,
                                  lora_rank=config.lora_rank, lora_alpha=float(config.lora_rank))
    model.train()
    new = [p for n, p in model.named_parameters() if "residual" in n or "patch_size_embed" in n or "lora_" in n]
    new_ids = {id(p) for p in new}
    for p in model.parameters():
        if id(p) not in new_ids:
            p.requires_grad_(False)
    null, native, weak = model.null_class, model.config.patch_size, config.weak_patch_sizes
    objective = objective_for(model.config)

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(images), (config.batch_size,), generator=gen)
        batch = objective.noised(images[idx], gen)
        y = drop_labels(rows[idx], config.caption_dropout, null, gen)
        return distillation_loss(model, batch, y, native, weak[int(torch.randint(len(weak), (1,), generator=gen))])

    train_loop("text-flexify-lora", out_dir, config, model, None, [{"params": new}], loss_fn, config.steps, config.lr,
               warmup=20)
    model.eval().save_pretrained(out_dir / "model")
    return model


def ship_prompt_table(model: FlexiTextDiT, per_digit: int = 6) -> None:
    """Install the shipped prompt table: search rows from training captions, held-out rows from captions of
    the held-out split that are not search rows (captions.prompt_table)."""
    size = model.config.input_size
    train = captions_for(*load_mnist(size, "train"))
    heldout = captions_for(*load_mnist(size, "heldout"))
    captions, num_search = prompt_table(train, heldout, per_digit)
    set_model_prompts(model, captions, num_search)
