"""Recipes for the DiT: pretrain a static class-conditional model (rectified flow), then flexify any model.

Flexify supports both of the paper's recipes, on pixel and latent models of any objective, class-conditional or
text-to-image (PixArt: trained on captioned images, each caption encoded once into a PromptCache):
  shared: the whole model is fine-tuned with its diffusion loss, one patch size drawn per sample;
  lora:   the base is frozen; per-size LoRA, the patch-size embedding and the embed/de-embed
          residuals learn to match the frozen native prediction, every output channel
          (distillation), so the native path stays bit-identical.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.images import load_dataset
from ..data.latents import LatentCache, TensorData
from ..data.moving_digits import load_moving_digits
from ..data.prompts import PromptCache
from ..errors import UserError
from ..files import CONFIG_NAME, atomic_write, fingerprint, read_json
from ..models.dit import FlexiDiT, FlexiDiTConfig
from ..models.flexible import FlexibleDiT
from ..models.layers import patch_shape
from ..models.text_dit import FlexiTextDiT
from ..sampling.stock import load_flexi_pipeline
from ..sampling.text_pipeline import FlexiTextDiTPipeline
from .loop import data_parallel, drop_labels, ema_copy, local_rows, pretrain, train_loop
from .objectives import distillation_loss, distribution_matching_loss, objective_for


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
    """Fine-tuning a pretrained DiT so that it also runs at the weak patch sizes.

    base is any model spec the search accepts (embedded:<name>, a FlexiDiT directory, a pipeline directory from
    `flexisearch convert`, dit:<hub id or DiTPipeline directory>, pixart:<hub id or PixArtAlphaPipeline
    directory>). A pixel model trains on `data` (mnist, digits8 or an image folder); a latent model on an image
    folder (one subfolder per class; for a text-to-image model, images listed with their captions in
    captions.jsonl), encoded once by its VAE into a latent cache, and its captions once by its text encoder into
    a prompt cache, under cache_dir (default: <out>/latent_cache). The objective is the one the model's config
    names (training.objectives).
    """

    base: str = ""
    data: str = "mnist"
    mode: str = "shared"  # "shared" or "lora"
    weak_patch_sizes: tuple[int, ...] | tuple[tuple[int, ...], ...] = (4,)  # video models: (t, h, w) sizes
    weak_prob: float = 0.5  # shared: chance that a sample trains at a weak size
    steps: int = 400  # 10% of the default pretraining
    batch_size: int = 128
    grad_accum: int = 1  # batches per optimizer step
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass: less memory, ~1/3 more compute
    lr: float = 2e-4
    new_layer_lr_mult: float = 10.0
    residual_init_std: float = 0.02
    lora_rank: int = 32
    class_dropout: float = 0.1
    ema_decay: float = 0.99  # with warm-up; over a few hundred steps the warm-up (1+t)/(10+t) sets the decay
    seed: int = 0
    ckpt_every: int = 100
    cache_dir: str = ""
    # The paper's optional recipe parts (README: measured on the embedded model):
    weak_bias: bool = False  # each weak size's embed / de-embed gets a bias of its own
    weak_norms: bool = False  # per-patch-size norms: an affine per weak size on every norm
    dm_weight: float = 0.0  # shared: weight of the bootstrapped distribution-matching (MMD) loss against exposure bias
    dm_span: float = 0.2  # its span of noise levels (a weak then a native step, each over half of it)
    dm_fraction: float = 0.25  # the share of each batch it runs on (two more forward passes per row)


def train_base(config: BaseTrainConfig, out_dir: str | Path) -> FlexiDiT:
    """Pretrain a static class-conditional DiT with rectified flow; writes out_dir/model (EMA) and out_dir/raw."""
    out_dir = Path(out_dir)
    images, labels = load_dataset(config.data, config.image_size, "train")
    torch.manual_seed(config.seed)
    model = FlexiDiT(FlexiDiTConfig(
        input_size=config.image_size, in_channels=images.shape[1], hidden_size=config.hidden_size,
        depth=config.depth, num_heads=config.num_heads, patch_size=config.patch_size,
        num_classes=int(labels.max()) + 1, learn_sigma=False, prediction="flow"))
    return pretrain("pretrain", out_dir, config, model, images, labels, config.class_dropout)


def _training_data(config: FlexifyConfig, base: FlexibleDiT, vae: Any, cache_dir: Path) -> TensorData | LatentCache:
    size, text = base.config.input_size, isinstance(base, FlexiTextDiT)
    if vae is None and text:
        raise UserError(f"{config.base}: a pixel-space text model; flexify it with its own recipe "
                        "(training.text_dit.train_text_flexify)")
    if len(base.config.sample_shape) == 4:  # a video model: the moving digits it was pretrained on
        if config.data != "moving-digits":
            raise UserError(f"flexify config: field 'data' is {config.data!r}; {config.base} is a video model, "
                            "expected 'moving-digits'")
        clips = load_moving_digits(base.config.num_frames, size, "train")
        data: TensorData | LatentCache = TensorData(clips.videos, clips.labels)
        channels = clips.videos.shape[1]
    elif vae is None:
        images, labels = load_dataset(config.data, size, "train")
        data = TensorData(images, labels)
        channels = images.shape[1]
    else:
        if config.data in ("mnist", "digits8"):
            raise UserError(f"flexify config: field 'data' is {config.data!r}; {config.base} is a latent model, "
                            "expected an image folder (one subfolder per class)")
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        rank, world = data_parallel()
        data = LatentCache.build(config.data, vae, size * factor, cache_dir, rank=rank, world=world)
        channels = data.latent_shape[0]
        if text != (data.captions is not None):
            raise UserError(f"flexify config: field 'data': {config.data} has "
                            f"{'captions' if data.captions is not None else 'classes'}, {config.base} is "
                            f"{'text-to-image: expected a captions.jsonl' if text else 'class-conditional'}")
    if channels != base.config.in_channels or not text and int(data.labels.max()) >= base.config.num_classes:
        raise UserError(f"{config.base}: model (channels={base.config.in_channels}, classes={base.config.num_classes}) "
                        f"does not fit data '{config.data}'")
    return data


class _Captioned(torch.nn.Module):
    """A text model called as model(x, t, rows, patch_size), its captions read from a PromptCache (rows of the cache,
    its null row for dropped captions): the training losses call every model that way."""

    def __init__(self, model: FlexiTextDiT, prompts: PromptCache):
        super().__init__()
        self.model, self.prompts = model, prompts

    def forward(self, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, patch_size: int) -> torch.Tensor:
        embeds, mask = self.prompts.rows(rows.cpu())
        return self.model.forward_text(x, t, embeds.to(x.device), mask.to(x.device), patch_size)


def encoder_key(pipe: FlexiTextDiTPipeline) -> str:
    """A name for what the pipeline's prompt encoding computes: its encoder's class and the states it gives a fixed
    caption (cheap next to hashing T5-XXL's 4.7B weights, and changes with them)."""
    embeds, mask = pipe.encode_prompt(["a photo of a cat sitting on a red sofa"])
    name = type(pipe.text_encoder).__name__ if pipe.text_encoder is not None else pipe.transformer.config.text_encoder
    return fingerprint({"encoder": name}, {"embeds": embeds, "mask": mask})


def _prompt_cache(pipe: FlexiTextDiTPipeline, captions: list[str], cache_dir: Path,
                  device: str | torch.device) -> PromptCache:
    """The training captions' PromptCache, encoded by worker 0 with the text encoder on device for the encoding
    only (PixArt's T5-XXL holds 19 GB in float32; training never needs it); worker 0 names the cache for all (the
    encoder_key of other devices could differ in the last bits)."""
    (rank, world), encoder = data_parallel(), pipe.text_encoder
    if encoder is not None and rank == 0:
        encoder.to(device)
    try:
        key = [encoder_key(pipe) if rank == 0 else None]
        if world > 1:
            torch.distributed.broadcast_object_list(key, src=0)
        return PromptCache.build(captions, pipe.encode_prompt, pipe.transformer.config.text_len, key[0], cache_dir,
                                 rank=rank)
    finally:
        if encoder is not None:
            encoder.to("cpu")


def _save(model: FlexiDiT, directory: Path, adapter: tuple[FlexiDiT, str] | None) -> None:
    if adapter is None:
        model.save_pretrained(directory)
    else:
        model.save_adapter(directory, *adapter)


def _pipeline_transformer(spec: str) -> str:
    """Where a pipeline spec's FlexiDiT is saved, for an adapter to name: a FlexiDiT pipeline's transformer/; ""
    for a DiTPipeline or dit: spec (converted in memory, nowhere to point)."""
    index = read_json(Path(spec) / "model_index.json", "pipeline index") if (Path(spec) / "model_index.json").is_file() else {}
    flexi = isinstance(index.get("_class_name"), list) and index["_class_name"][-1] in ("FlexiDiTPipeline",
                                                                                          "FlexiTextDiTPipeline")
    return str(Path(spec) / "transformer") if flexi else ""


def train_flexify(config: FlexifyConfig, out_dir: str | Path, device: str | torch.device = "cpu") -> FlexibleDiT:
    """Add the weak patch sizes to a pretrained model and fine-tune them (shared or lora) on device; writes
    out_dir/model (EMA weights; with LoRA the frozen base is unchanged by the average: a FlexiDiT directory
    for a pixel model, a pipeline directory for a pipeline, dit: or pixart: base) and out_dir/raw (the last
    weights)."""
    if config.mode not in ("shared", "lora"):
        raise UserError(f"flexify config: field 'mode' is {config.mode!r}, expected 'shared' or 'lora'")
    if config.dm_weight and (config.mode != "shared" or not 0 < config.dm_span < 1 or not 0 < config.dm_fraction <= 1):
        raise UserError("flexify config: field 'dm_weight' needs mode 'shared', 0 < dm_span < 1 and "
                        "0 < dm_fraction <= 1")
    out_dir = Path(out_dir)
    pipe = load_flexi_pipeline(config.base)
    base, vae = pipe.transformer.to(device), pipe.vae if pipe.vae is None else pipe.vae.to(device)
    extent, native = base.config.sample_shape[1:], patch_shape(base.config.patch_size)
    for p in config.weak_patch_sizes:
        shape = patch_shape(p)
        if (len(shape) != len(native) or any(e % q for e, q in zip(extent, shape)) or shape == native
                or any(q < q0 for q, q0 in zip(shape, native))):
            raise UserError(f"flexify config: weak patch size {p} must divide {list(extent)} and exceed "
                            f"{base.config.patch_size}")
    objective = objective_for(base.config)
    cache_dir = Path(config.cache_dir or out_dir / "latent_cache")
    data = _training_data(config, base, vae, cache_dir)
    prompts = _prompt_cache(pipe, data.captions, cache_dir, device) if isinstance(base, FlexiTextDiT) else None
    torch.manual_seed(config.seed)
    lora = config.mode == "lora"
    model = base.with_patch_sizes(config.weak_patch_sizes, init_std=config.residual_init_std,
                                  lora_rank=config.lora_rank if lora else 0, lora_alpha=float(config.lora_rank),
                                  weak_bias=config.weak_bias, weak_norms=config.weak_norms)
    model.train()
    ema = ema_copy(model)
    model.gradient_checkpointing = config.gradient_checkpointing
    new = [p for n, p in model.named_parameters() if "residual" in n or "patch_size_embed" in n or "lora_" in n]
    new_ids = {id(p) for p in new}
    old = [p for p in model.parameters() if id(p) not in new_ids]
    forward = model if prompts is None else _Captioned(model, prompts)
    null = model.null_class if prompts is None else prompts.null_row
    native, weak = model.config.patch_size, config.weak_patch_sizes
    if lora:
        for p in old:
            p.requires_grad_(False)
        groups = [{"params": new, "lr_mult": 1.0}]
    else:
        groups = [{"params": old, "lr_mult": 1.0}, {"params": new, "lr_mult": config.new_layer_lr_mult}]

    rows = local_rows(config.batch_size)

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(data), (config.batch_size,), generator=gen)
        x0, y = data.batch(idx, gen)
        batch = objective.noised(x0, gen)
        y = drop_labels(y, config.class_dropout, null, gen)
        batch, y = batch.select(rows).to(device), y[rows].to(device)
        if lora:
            return distillation_loss(forward, batch, y, native, weak[int(torch.randint(len(weak), (1,), generator=gen))])
        # Shared weights: a patch size per sample (0: native, i: weak[i - 1]), one forward per size in the batch.
        choice = torch.where(torch.rand(len(idx), generator=gen) < config.weak_prob,
                             1 + torch.randint(len(weak), (len(idx),), generator=gen),
                             torch.zeros(len(idx), dtype=torch.long))[rows].to(device)
        losses = torch.zeros(len(y), device=device)
        for i in choice.unique().tolist():
            sel, p = choice == i, (native, *weak)[i]
            losses[sel] = objective.losses(forward(batch.xt[sel], batch.t[sel], y[sel], p), batch.select(sel)).float()
        if not config.dm_weight:
            return losses.mean()
        k = max(2, round(config.dm_fraction * len(y)))  # MMD over this worker's first k rows
        p = weak[int(torch.randint(len(weak), (1,), generator=gen))]
        dm = distribution_matching_loss(forward, objective, batch.x0[:k], y[:k], native, p, gen, config.dm_span)
        return losses.mean() + config.dm_weight * dm

    lr = config.lr if not lora else config.lr * config.new_layer_lr_mult
    train_loop(f"flexify-{config.mode}", out_dir, config, model, ema, groups, loss_fn, config.steps, lr, warmup=20,
               grad_accum=config.grad_accum)
    ema.eval()
    if data_parallel()[0] != 0:  # worker 0 writes the results
        return ema
    model_dir = config.base.startswith("embedded:") or (Path(config.base) / CONFIG_NAME).is_file()
    base_dir = config.base if model_dir else _pipeline_transformer(config.base)
    adapter = (base, base_dir) if lora and base_dir else None  # LoRA: the adapters alone, on the base where it is
    if model_dir:
        _save(ema, out_dir / "model", adapter)
    else:
        pipe.register_modules(transformer=ema)
        atomic_write(out_dir / "model", functools.partial(pipe.save_pretrained, adapter_base=adapter))
    _save(model.eval(), out_dir / "raw", adapter)
    return ema
