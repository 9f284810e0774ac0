"""Training: pretrain a static DiT (rectified flow), then flexify it to extra patch sizes.

Both runs are seeded, log their loss to `loss.jsonl`, save a resumable checkpoint (safetensors +
JSON, no pickle) every `ckpt_every` steps and on exit, and write the final model with
`save_pretrained`. Flexify supports both of the paper's recipes:
  shared: the whole model is fine-tuned with the diffusion loss, one patch size drawn per sample;
  lora:   the base is frozen; per-size LoRA, the patch-size embedding and the embed/de-embed
          residuals learn to match the frozen native prediction (distillation), so the native
          path stays bit-identical.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .data import load_dataset
from .errors import UserError, atomic_write_json, read_json
from .model import FlexiDiT, FlexiDiTConfig

CKPT_WEIGHTS = "checkpoint.safetensors"
CKPT_META = "checkpoint.json"


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


def config_from_json(cls: type, path: str | Path | None, overrides: dict) -> object:
    """A config dataclass from an optional JSON file plus CLI overrides; unknown or mistyped keys are UserErrors."""
    d = dict(read_json(path, "config") if path else {})
    d.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key not in fields:
            raise UserError(f"{path or 'config'}: unknown field '{key}'")
        default = fields[key].default
        if isinstance(default, tuple):
            if not (isinstance(value, (list, tuple)) and all(isinstance(v, int) and v > 0 for v in value)):
                raise UserError(f"{path or 'config'}: field '{key}' expected a list of positive integers")
            d[key] = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            d[key] = float(value)
        elif not isinstance(value, type(default)) or isinstance(value, bool) != isinstance(default, bool):
            raise UserError(f"{path or 'config'}: field '{key}' has {value!r}, expected {type(default).__name__}")
        if isinstance(d[key], (int, float)) and not isinstance(d[key], bool) and d[key] < 0:
            raise UserError(f"{path or 'config'}: field '{key}' must be >= 0")
    return cls(**d)


def flow_pair(x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified flow: x_t = (1 - s) x0 + s noise, target velocity noise - x0, timestep s * 1000."""
    noise = torch.randn(x0.shape, generator=gen)
    s = torch.rand(x0.shape[0], generator=gen)
    xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
    return xt, s * 1000, noise - x0


def drop_labels(y: torch.Tensor, prob: float, null: int, gen: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(y.shape[0], generator=gen) < prob, torch.full_like(y, null), y)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class Checkpoint:
    """Resumable training state in out_dir: model (+EMA), optimizer moments, RNG, step, losses."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def exists(self) -> bool:
        return (self.out_dir / CKPT_META).is_file()

    def save(self, step: int, model: torch.nn.Module, ema: torch.nn.Module | None, opt: torch.optim.Optimizer,
             gen: torch.Generator, config: object) -> None:
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
        if ema is not None:
            tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()})
        for i, state in opt.state_dict()["state"].items():
            for k, v in state.items():
                tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).contiguous()
        tensors["rng"] = gen.get_state()
        tmp = self.out_dir / f".{CKPT_WEIGHTS}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.out_dir / CKPT_WEIGHTS)
        atomic_write_json(self.out_dir / CKPT_META, {"step": step, "config": dataclasses.asdict(config),
                                                     "model_config": model.config.to_dict()})

    def load(self, model: torch.nn.Module, ema: torch.nn.Module | None, opt: torch.optim.Optimizer,
             gen: torch.Generator, config: object) -> int:
        meta = read_json(self.out_dir / CKPT_META, "checkpoint")
        if meta.get("config") != json.loads(json.dumps(dataclasses.asdict(config))):
            raise UserError(f"{self.out_dir / CKPT_META}: checkpoint was made with another config; use a new --out")
        try:
            tensors = load_file(str(self.out_dir / CKPT_WEIGHTS))
        except Exception as e:
            raise UserError(f"{self.out_dir / CKPT_WEIGHTS}: unreadable checkpoint ({e})") from None
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        state = opt.state_dict()
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state["state"].setdefault(int(i), {})[name] = v
        opt.load_state_dict(state)
        gen.set_state(tensors["rng"])
        return int(meta["step"])


def _loop(name: str, out_dir: Path, config: object, model: FlexiDiT, ema: FlexiDiT | None,
          param_groups: list[dict], loss_fn, total_steps: int, base_lr: float, warmup: int) -> list[float]:
    """Shared training loop: AdamW, LR schedule, EMA with warm-up, logging, checkpoint/resume."""
    out_dir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(param_groups, lr=base_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    ckpt = Checkpoint(out_dir)
    start = ckpt.load(model, ema, opt, gen, config) if ckpt.exists() else 0
    log_path = out_dir / "loss.jsonl"
    if start == 0:
        log_path.unlink(missing_ok=True)
    losses: list[float] = []
    t0 = time.time()
    bar = tqdm(range(start, total_steps), desc=name, initial=start, total=total_steps, dynamic_ncols=True,
               disable=None)  # no bar when not on a terminal
    with log_path.open("a") as log:
        for step in bar:
            lr = lr_at(step, total_steps, base_lr, warmup)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)
            loss = loss_fn(gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                # Warm-up avoids the trap of a fixed 0.999 decay that keeps ~10% of the random init.
                decay = min(config.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(pm, 1 - decay)
            losses.append(loss.item())
            log.write(json.dumps({"step": step + 1, "loss": round(losses[-1], 6), "lr": lr,
                                  "elapsed_s": round(time.time() - t0, 2)}) + "\n")
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
            if (step + 1) % config.ckpt_every == 0 or step + 1 == total_steps:
                log.flush()
                ckpt.save(step + 1, model, ema, opt, gen, config)
    return losses


def train_base(config: BaseTrainConfig, out_dir: str | Path) -> FlexiDiT:
    """Pretrain a static class-conditional DiT with rectified flow; writes out_dir/model (EMA) and out_dir/raw."""
    out_dir = Path(out_dir)
    images, labels = load_dataset(config.data, config.image_size, "train")
    torch.manual_seed(config.seed)
    model = FlexiDiT(FlexiDiTConfig(
        input_size=config.image_size, in_channels=images.shape[1], hidden_size=config.hidden_size,
        depth=config.depth, num_heads=config.num_heads, patch_size=config.patch_size,
        num_classes=int(labels.max()) + 1, learn_sigma=False, prediction="flow"))
    ema = FlexiDiT(model.config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    null = model.null_class

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(images), (config.batch_size,), generator=gen)
        xt, t, target = flow_pair(images[idx], gen)
        y = drop_labels(labels[idx], config.class_dropout, null, gen)
        return ((model(xt, t, y) - target) ** 2).mean()

    t0 = time.time()
    _loop("pretrain", out_dir, config, model, ema, [{"params": list(model.parameters())}], loss_fn,
          config.steps, config.lr, config.warmup)
    ema.save_pretrained(out_dir / "model")
    model.save_pretrained(out_dir / "raw")
    atomic_write_json(out_dir / "train_info.json", {"kind": "base", "config": dataclasses.asdict(config),
                                                    "wall_s_last_session": round(time.time() - t0, 1)})
    return ema.eval()


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
    ema = FlexiDiT(model.config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
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
    _loop(f"flexify-{config.mode}", out_dir, config, model, ema, groups, loss_fn, config.steps, lr, warmup=20)
    ema.eval().save_pretrained(out_dir / "model")
    model.eval().save_pretrained(out_dir / "raw")
    atomic_write_json(out_dir / "train_info.json", {"kind": "flexify", "config": dataclasses.asdict(config),
                                                    "wall_s_last_session": round(time.time() - t0, 1)})
    return ema
