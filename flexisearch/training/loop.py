"""The one training loop and what every recipe shares: config files, label dropout, the learning-rate
schedule, EMA with warm-up, gradient accumulation, bf16 autocast on CUDA and resumable checkpoints.

A run is seeded, logs its loss to `loss.jsonl`, and saves a resumable checkpoint (safetensors + JSON,
no pickle) every `ckpt_every` steps and at the end; rerunning the same command resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import UserError
from ..files import atomic_write_json, load_weights, read_json, save_weights
from ..models.flexible import FlexibleDiT
from ..validate import read_dataclass
from .objectives import objective_for

CKPT_WEIGHTS = "checkpoint.safetensors"
CKPT_META = "checkpoint.json"


def read_config(cls: type, path: str | Path | None, overrides: dict[str, Any]) -> Any:
    """A training config dataclass from an optional JSON file plus CLI overrides (None: not given)."""
    raw = read_json(path, "config") if path else {}
    if isinstance(raw, dict):
        raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    return read_dataclass(cls, raw, str(path or "config"))


def drop_labels(y: torch.Tensor, prob: float, null: int, gen: torch.Generator) -> torch.Tensor:
    drop = (torch.rand(y.shape[0], generator=gen) < prob).to(y.device)
    return torch.where(drop, torch.full_like(y, null), y)


def data_parallel() -> tuple[int, int]:
    """(rank, world size) of this process in a torch.distributed group (Ray Train's workers), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def local_rows(batch_size: int) -> slice:
    """This worker's rows of a global batch. Every worker draws the whole batch from the same generator and
    keeps its rows, so N workers train exactly as one process on the same global batch."""
    rank, world = data_parallel()
    if batch_size % world:
        raise UserError(f"config: field 'batch_size' is {batch_size}, expected a multiple of the {world} workers")
    n = batch_size // world
    return slice(rank * n, (rank + 1) * n)


def _average_gradients(params: list[torch.Tensor], loss: torch.Tensor, world: int) -> torch.Tensor:
    """All-reduce the gradients (a missing one counts as zero) and the loss in one flat buffer; returns the
    mean loss. The mean of the workers' mean gradients over equal shards is the global batch's gradient."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads] + [loss.view(1)])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return flat[-1]


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
        tensors["step"] = torch.tensor(step)  # with the weights it belongs to: the JSON beside is written apart
        save_weights(self.out_dir / CKPT_WEIGHTS, tensors)
        atomic_write_json(self.out_dir / CKPT_META, {"step": step, "config": dataclasses.asdict(config),
                                                     "model_config": model.config.to_dict()})

    def load(self, model: torch.nn.Module, ema: torch.nn.Module | None, opt: torch.optim.Optimizer,
             gen: torch.Generator, config: object) -> int:
        meta = read_json(self.out_dir / CKPT_META, "checkpoint")
        if meta.get("config") != json.loads(json.dumps(dataclasses.asdict(config))):
            raise UserError(f"{self.out_dir / CKPT_META}: checkpoint was made with another config; use a new --out")
        tensors = load_weights(self.out_dir / CKPT_WEIGHTS)
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
        return int(tensors["step"] if "step" in tensors else meta["step"])  # older checkpoints: the JSON's


def train_loop(name: str, out_dir: Path, config: Any, model: FlexibleDiT, ema: FlexibleDiT | None,
               param_groups: list[dict], loss_fn: Callable[[torch.Generator], torch.Tensor], total_steps: int,
               base_lr: float, warmup: int, grad_accum: int = 1) -> list[float]:
    """Shared training loop: AdamW, LR schedule, EMA with warm-up, logging, checkpoint/resume, train_info.json.

    Each optimizer step averages the gradients of `grad_accum` calls of loss_fn (each draws its own
    batch); on CUDA the forward passes run under bf16 autocast (weights and optimizer stay float32).
    In a torch.distributed group (data_parallel) every worker runs this loop on its rows of the batch
    (local_rows), the gradients are averaged before each step, and worker 0 alone writes the log and
    the checkpoints (out_dir must then be storage every worker reads).
    """
    rank, world = data_parallel()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    trainable = [p for g in param_groups for p in g["params"]]
    opt = torch.optim.AdamW(param_groups, lr=base_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    ckpt = Checkpoint(out_dir)
    start = ckpt.load(model, ema, opt, gen, config) if ckpt.exists() else 0
    log_path = out_dir / "loss.jsonl" if rank == 0 else Path(os.devnull)
    if start == 0 and rank == 0:
        log_path.unlink(missing_ok=True)
    losses: list[float] = []
    t0 = time.time()
    bar = tqdm(range(start, total_steps), desc=name, initial=start, total=total_steps, dynamic_ncols=True,
               disable=None if rank == 0 else True)  # no bar when not on a terminal
    with log_path.open("a") as log:
        for step in bar:
            lr = lr_at(step, total_steps, base_lr, warmup)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)
            opt.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            for _ in range(grad_accum):
                with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                    micro = loss_fn(gen) / grad_accum
                micro.backward()
                loss += micro.detach()
            if world > 1:
                loss = _average_gradients(trainable, loss, world)
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
            if rank == 0 and ((step + 1) % config.ckpt_every == 0 or step + 1 == total_steps):
                log.flush()
                ckpt.save(step + 1, model, ema, opt, gen, config)
    if rank == 0:
        atomic_write_json(out_dir / "train_info.json", {
            "kind": name, "config": dataclasses.asdict(config), "workers": world, "resumed_from_step": start,
            "wall_s_last_session": round(time.time() - t0, 1)})
    return losses


def ema_copy(model: FlexibleDiT) -> FlexibleDiT:
    """A frozen copy of the model that train_loop keeps as the exponential moving average."""
    ema = model._like(model.config)
    ema.load_state_dict(model.state_dict())
    return ema.requires_grad_(False)


def pretrain(name: str, out_dir: Path, config: Any, model: FlexibleDiT, images: torch.Tensor,
             labels: torch.Tensor, dropout: float) -> FlexibleDiT:
    """Pretraining at the native patch size on the objective the model's config names, with label dropout to
    the null label (classifier-free guidance); writes out_dir/model (EMA), out_dir/raw and train_info.json, and
    returns the EMA model."""
    ema = ema_copy(model)
    objective = objective_for(model.config)

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(images), (config.batch_size,), generator=gen)
        batch = objective.noised(images[idx], gen)
        y = drop_labels(labels[idx], dropout, model.null_class, gen)
        return objective.losses(model(batch.xt, batch.t, y), batch).mean()

    train_loop(name, out_dir, config, model, ema, [{"params": list(model.parameters())}], loss_fn,
               config.steps, config.lr, config.warmup)
    ema.eval().save_pretrained(out_dir / "model")
    model.eval().save_pretrained(out_dir / "raw")
    return ema
