"""Pre-trained DiT weights in and out of FlexiDiT.

Two sources: diffusers' `DiTTransformer2DModel` (e.g. facebook/DiT-XL-2-256 saved locally) and
checkpoints in the layout of facebookresearch/DiT (`DiT-XL-2-256x256.pt`, or a training checkpoint
with "model"/"ema" entries). Both map onto FlexiDiT's native path with no approximation; the two
differ only in the timestep features (diffusers divides the frequencies by half - 1, the original
by half) and in the MLP norm's eps, which FlexiDiTConfig records.

Every problem with a checkpoint is a one-line UserError that names the offending weight.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from ..errors import UserError
from ..files import check_state
from .dit import PRESETS, FlexiDiT, FlexiDiTConfig
from .flexible import FlexibleDiT
from .text_dit import FlexiTextDiT, FlexiTextDiTConfig
from .wan import FlexiWan, FlexiWanConfig

if TYPE_CHECKING:  # importing diffusers takes seconds; only the diffusers paths need it
    from diffusers import DiTTransformer2DModel, WanTransformer3DModel


def _load(model: FlexibleDiT, state: dict[str, torch.Tensor], source: str,
          names: dict[str, str] | None = None) -> FlexibleDiT:
    """model (just built from its config) holding exactly the weights in state (its own key names); a text model's
    prompt table, input data rather than weights, stays empty.

    names maps a key to the checkpoint's own name for it, so errors quote the latter.
    """
    table = {k: v for k, v in model.state_dict().items() if k in ("prompt_embeds", "prompt_mask")}
    check_state(state, {k: v for k, v in model.state_dict().items() if k not in table}, source, names)
    model.load_state_dict({**state, **table})
    return model.float().eval()


class _Weights:
    """A source model's state dict, taken key by key (a missing key is a one-line error), so that a conversion can
    refuse the weights it took nowhere (check_all_taken)."""

    def __init__(self, model: Any, source: str):
        self.sd = {k: v.detach() for k, v in model.state_dict().items()}
        self.source, self.used = source, set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise UserError(f"{self.source}: weight '{key}' missing")
        self.used.add(key)
        return self.sd[key]

    def check_all_taken(self, target: str) -> None:
        left = sorted(set(self.sd) - self.used)
        if left:
            raise UserError(f"{self.source}: weight '{left[0]}' has no counterpart in {target}")


# ---- diffusers ------------------------------------------------------------------------------

def _geometry(cfg: Any, sd: dict[str, torch.Tensor], out_channels: int) -> dict[str, Any]:
    """The FlexiDiTConfig fields a diffusers DiT or PixArt transformer config determines (sizes, norm eps, sigma)."""
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    return {"input_size": cfg.sample_size, "in_channels": cfg.in_channels, "hidden_size": hidden,
            "depth": cfg.num_layers, "num_heads": cfg.num_attention_heads,
            "mlp_ratio": sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / hidden,
            "patch_size": cfg.patch_size, "learn_sigma": out_channels == 2 * cfg.in_channels,
            "mlp_norm_eps": cfg.norm_eps}


def from_diffusers_dit(model: DiTTransformer2DModel, prediction: str = "epsilon") -> FlexiDiT:
    """FlexiDiT (native patch size only, float32, same device) with the outputs of a diffusers DiT.

    Diffusers gives every block its own timestep/label embedder but only uses block 0's in the
    final layer; DiT shares one, so all blocks' embedders must be identical (they are in every
    converted DiT checkpoint).
    """
    cfg = model.config
    unsupported = {
        "norm_type": (cfg.norm_type, "ada_norm_zero"),
        "activation_fn": (cfg.activation_fn, "gelu-approximate"),
        "norm_elementwise_affine": (cfg.norm_elementwise_affine, False),
        "attention_bias": (cfg.attention_bias, True),
    }
    for name, (value, want) in unsupported.items():
        if value != want:
            raise UserError(f"diffusers DiT: config '{name}' is {value!r}; only {want!r} (as in DiT) is supported")
    take = _Weights(model, "diffusers DiT")
    sd = take.sd
    emb0 = "transformer_blocks.0.norm1.emb."
    for i in range(1, cfg.num_layers):
        emb = f"transformer_blocks.{i}.norm1.emb."
        for key in [k for k in sd if k.startswith(emb)]:
            if not torch.equal(take(key), sd[emb0 + key[len(emb):]]):
                raise UserError(f"diffusers DiT: block {i}'s conditioning embedder differs from block 0's "
                                f"('{key}'); FlexiDiT shares one embedder across blocks")
    num_classes = cfg.num_embeds_ada_norm
    rows = sd[emb0 + "class_embedder.embedding_table.weight"].shape[0]
    if rows != num_classes + 1:
        raise UserError(f"diffusers DiT: label table has {rows} rows for {num_classes} classes; "
                        "a null-class row (class dropout > 0) is needed for classifier-free guidance")
    out_channels = model.out_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise UserError(f"diffusers DiT: out_channels {out_channels} is neither in_channels nor 2 x in_channels")
    config = FlexiDiTConfig(**_geometry(cfg, sd, out_channels), num_classes=num_classes, prediction=prediction,
                            timestep_freq_shift=1.0)
    state = {
        "x_embedder.proj.weight": take("pos_embed.proj.weight"),
        "x_embedder.proj.bias": take("pos_embed.proj.bias"),
        "y_embedder.weight": take(emb0 + "class_embedder.embedding_table.weight"),
        "final_layer.adaLN_modulation.1.weight": take("proj_out_1.weight"),
        "final_layer.adaLN_modulation.1.bias": take("proj_out_1.bias"),
        "final_layer.deembed.linear.weight": take("proj_out_2.weight"),
        "final_layer.deembed.linear.bias": take("proj_out_2.bias"),
    }
    for j, name in ((0, "linear_1"), (2, "linear_2")):
        for kind in ("weight", "bias"):
            state[f"t_embedder.mlp.{j}.{kind}"] = take(f"{emb0}timestep_embedder.{name}.{kind}")
    for i in range(cfg.num_layers):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [take(f"{src}attn1.to_{n}.{kind}") for n in "qkv"]
            state[f"{dst}attn.qkv.{kind}"] = torch.cat(qkv)
            state[f"{dst}attn.proj.{kind}"] = take(f"{src}attn1.to_out.0.{kind}")
            state[f"{dst}mlp.fc1.{kind}"] = take(f"{src}ff.net.0.proj.{kind}")
            state[f"{dst}mlp.fc2.{kind}"] = take(f"{src}ff.net.2.{kind}")
            state[f"{dst}adaLN_modulation.1.{kind}"] = take(f"{src}norm1.linear.{kind}")
    take.check_all_taken("FlexiDiT")
    return _load(FlexiDiT(config), state, "diffusers DiT").to(model.device)


def to_diffusers_dit(flexi: FlexiDiT) -> DiTTransformer2DModel:
    """The native path of a FlexiDiT as a diffusers DiT (extra patch sizes and LoRA are dropped).

    Only models with diffusers' timestep features (timestep_freq_shift=1) and MLP ratio 4 can be
    expressed exactly; anything else is a UserError rather than a silently different model.
    """
    from diffusers import DiTTransformer2DModel

    c = flexi.config
    if c.timestep_freq_shift != 1:
        raise UserError(f"to diffusers: timestep_freq_shift is {c.timestep_freq_shift}; diffusers' DiT only has 1")
    if c.mlp_ratio != 4:
        raise UserError(f"to diffusers: mlp_ratio is {c.mlp_ratio}; diffusers' DiT only has 4")
    model = DiTTransformer2DModel(
        num_attention_heads=c.num_heads,
        attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        num_layers=c.depth,
        sample_size=c.input_size,
        patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes,
        norm_eps=c.mlp_norm_eps,
    )
    sd = {k: v.detach() for k, v in flexi.state_dict().items()}
    emb = {
        "timestep_embedder.linear_1.weight": sd["t_embedder.mlp.0.weight"],
        "timestep_embedder.linear_1.bias": sd["t_embedder.mlp.0.bias"],
        "timestep_embedder.linear_2.weight": sd["t_embedder.mlp.2.weight"],
        "timestep_embedder.linear_2.bias": sd["t_embedder.mlp.2.bias"],
        "class_embedder.embedding_table.weight": sd["y_embedder.weight"],
    }
    state = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.deembed.linear.weight"],
        "proj_out_2.bias": sd["final_layer.deembed.linear.bias"],
    }
    for i in range(c.depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        state.update({f"{dst}norm1.emb.{k}": v for k, v in emb.items()})
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{kind}"].chunk(3)
            state.update({f"{dst}attn1.to_q.{kind}": q, f"{dst}attn1.to_k.{kind}": k, f"{dst}attn1.to_v.{kind}": v})
            state[f"{dst}attn1.to_out.0.{kind}"] = sd[f"{src}attn.proj.{kind}"]
            state[f"{dst}ff.net.0.proj.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
            state[f"{dst}ff.net.2.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
            state[f"{dst}norm1.linear.{kind}"] = sd[f"{src}adaLN_modulation.1.{kind}"]
    model.load_state_dict(state)
    return model.to(next(flexi.parameters()).device).eval()


# ---- facebookresearch/DiT -------------------------------------------------------------------

# Original key -> FlexiDiT key, where they differ. The original's pos_embed is a fixed sin-cos
# table that FlexiDiT recomputes; it is only checked against the config.
_ORIGINAL_RENAMES = {
    "y_embedder.embedding_table.weight": "y_embedder.weight",
    "final_layer.linear.weight": "final_layer.deembed.linear.weight",
    "final_layer.linear.bias": "final_layer.deembed.linear.bias",
}


def from_original_state_dict(state: dict[str, torch.Tensor], config: FlexiDiTConfig,
                             source: str = "checkpoint") -> FlexiDiT:
    """FlexiDiT from a state dict in facebookresearch/DiT's layout; config must match its shapes."""
    if config.extra_patch_sizes or config.lora_rank:
        raise UserError(f"{source}: an original DiT checkpoint has the native patch size only; "
                        "add patch sizes afterwards with FlexiDiT.with_patch_sizes")
    state = dict(state)
    pos = state.pop("pos_embed", None)
    tokens = (config.input_size // config.patch_size) ** 2
    if pos is not None and tuple(pos.shape) != (1, tokens, config.hidden_size):
        raise UserError(f"{source}: weight 'pos_embed' has shape {tuple(pos.shape)}, "
                        f"config expects {(1, tokens, config.hidden_size)}")
    names = {new: old for old, new in _ORIGINAL_RENAMES.items()}
    return _load(FlexiDiT(config), {_ORIGINAL_RENAMES.get(k, k): v for k, v in state.items()}, source, names)


def infer_original_config(state: dict[str, torch.Tensor], num_heads: int | None = None, preset: str | None = None,
                          input_size: int | None = None, prediction: str = "epsilon",
                          source: str = "checkpoint") -> FlexiDiTConfig:
    """Config of an original-layout state dict from its shapes.

    The head count is not visible in the shapes: give num_heads, or a preset name whose heads are
    used and whose width, depth and patch size the checkpoint must match. input_size defaults to
    the one implied by the pos_embed table (so a 512 px DiT-XL/2 needs no flag), else 32. The
    label table is taken to include the null class (class dropout > 0, as in every DiT).
    """
    if (num_heads is None) == (preset is None):
        raise ValueError("give exactly one of num_heads and preset")
    for key in ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
                "blocks.0.mlp.fc1.weight"):
        if not isinstance(state.get(key), torch.Tensor):
            raise UserError(f"{source}: weight '{key}' missing; not a facebookresearch/DiT checkpoint")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
        want = PRESETS[preset]
        for field, value in (("hidden_size", hidden), ("depth", depth), ("patch_size", patch)):
            if value != getattr(want, field):
                raise UserError(f"{source}: checkpoint has {field} {value}, preset {preset} expects {getattr(want, field)}")
        num_heads = want.num_heads
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserError(f"{source}: weight 'final_layer.linear.weight' gives {out_channels} output channels "
                        f"for {in_channels} input channels")
    if input_size is None:
        pos = state.get("pos_embed")
        input_size = round(pos.shape[1] ** 0.5) * patch if isinstance(pos, torch.Tensor) else 32
    config = FlexiDiTConfig(
        input_size=input_size,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        patch_size=patch,
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
        prediction=prediction,
    )
    config.check(source)
    return config


def _unpickling_detail(e: Exception) -> str:
    """The one informative line of torch.load's long weights_only error."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict of a .safetensors file or a .pt file read with torch.load(weights_only=True).

    A training checkpoint's EMA weights are preferred over its raw ones (as DiT's sample.py does);
    its argparse.Namespace of arguments is the one non-tensor class allowed while unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        if path.suffix == ".safetensors":
            ckpt = load_file(str(path))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickling_detail(e)
        if detail.startswith("Unsupported global"):
            raise UserError(f"{path}: refused, it pickles objects other than tensors ({detail.split('. ')[0]})") from None
        raise UserError(f"{path}: not a readable checkpoint ({detail})") from None
    except Exception as e:  # corrupt or foreign files raise assorted error types
        raise UserError(f"{path}: not a readable checkpoint ({_unpickling_detail(e)})") from None
    if isinstance(ckpt, dict):
        ckpt = ckpt.get("ema", ckpt.get("model", ckpt))
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UserError(f"{path}: expected a state dict of tensors (or one under 'ema' or 'model')")
    return ckpt


def load_original_checkpoint(path: str | Path, config: str | FlexiDiTConfig, prediction: str = "epsilon") -> FlexiDiT:
    """FlexiDiT from a facebookresearch/DiT checkpoint; config is a preset name or a full config.

    With a preset name, sizes are read from the checkpoint (so a 512 px DiT-XL/2 loads under
    "DiT-XL/2") and must agree with the preset's width, depth and patch size, and prediction
    sets what the network predicts. A full config carries its own.
    """
    state = read_checkpoint(path)
    if isinstance(config, str):
        config = infer_original_config(state, preset=config, prediction=prediction, source=str(path))
    return from_original_state_dict(state, config, source=str(path))


# ---- diffusers PixArt-alpha (text-to-image) -------------------------------------------------

def from_diffusers_pixart(model: Any, text_len: int = 120, text_encoder: str = "t5-v1_1-xxl",
                          prediction: str = "epsilon") -> FlexiTextDiT:
    """FlexiTextDiT (native patch size only, float32, same device) with the outputs of a diffusers
    PixArtTransformer2DModel: forward_text(x, t, encoder_hidden_states, encoder_attention_mask)
    equals the diffusers forward. The prompt table is empty (null row only): fill it with
    FlexiTextDiT.set_prompts. Only use_additional_conditions=False (PixArt-alpha 256/512) is supported.
    """
    cfg = model.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    unsupported = {
        "norm_type": (cfg.norm_type, "ada_norm_single"),
        "activation_fn": (cfg.activation_fn, "gelu-approximate"),
        "norm_elementwise_affine": (cfg.norm_elementwise_affine, False),
        "attention_bias": (cfg.attention_bias, True),
        "attention_type": (cfg.attention_type, "default"),
        "use_additional_conditions": (bool(model.use_additional_conditions), False),
        "cross_attention_dim": (cfg.cross_attention_dim, hidden),
    }
    for name, (value, want) in unsupported.items():
        if value != want:
            raise UserError(f"diffusers PixArt: config '{name}' is {value!r}; only {want!r} is supported")
    if cfg.caption_channels is None:
        raise UserError("diffusers PixArt: config 'caption_channels' is None; a caption projection is required")
    take = _Weights(model, "diffusers PixArt")
    interpolation = cfg.interpolation_scale if cfg.interpolation_scale is not None else max(cfg.sample_size // 64, 1)
    config = FlexiTextDiTConfig(
        **_geometry(cfg, take.sd, model.out_channels),
        num_classes=0,
        prediction=prediction,
        timestep_freq_shift=0.0,  # PixArt: Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)
        caption_channels=cfg.caption_channels,
        text_len=text_len,
        interpolation_scale=float(interpolation),
        text_encoder=text_encoder,
    )
    if model.out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise UserError(f"diffusers PixArt: out_channels {model.out_channels} is neither in_channels nor 2 x in_channels")
    emb = "adaln_single.emb.timestep_embedder."
    state = {
        "x_embedder.proj.weight": take("pos_embed.proj.weight"),
        "x_embedder.proj.bias": take("pos_embed.proj.bias"),
        "scale_shift_table": take("scale_shift_table"),
        "deembed.linear.weight": take("proj_out.weight"),
        "deembed.linear.bias": take("proj_out.bias"),
    }
    for kind in ("weight", "bias"):
        state[f"t_embedder.mlp.0.{kind}"] = take(f"{emb}linear_1.{kind}")
        state[f"t_embedder.mlp.2.{kind}"] = take(f"{emb}linear_2.{kind}")
        state[f"t_block.1.{kind}"] = take(f"adaln_single.linear.{kind}")
        state[f"caption_projection.linear_1.{kind}"] = take(f"caption_projection.linear_1.{kind}")
        state[f"caption_projection.linear_2.{kind}"] = take(f"caption_projection.linear_2.{kind}")
    for i in range(cfg.num_layers):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        state[f"{dst}scale_shift_table"] = take(f"{src}scale_shift_table")
        for kind in ("weight", "bias"):
            state[f"{dst}attn.qkv.{kind}"] = torch.cat([take(f"{src}attn1.to_{n}.{kind}") for n in "qkv"])
            state[f"{dst}attn.proj.{kind}"] = take(f"{src}attn1.to_out.0.{kind}")
            state[f"{dst}cross_attn.q.{kind}"] = take(f"{src}attn2.to_q.{kind}")
            state[f"{dst}cross_attn.kv.{kind}"] = torch.cat([take(f"{src}attn2.to_{n}.{kind}") for n in "kv"])
            state[f"{dst}cross_attn.proj.{kind}"] = take(f"{src}attn2.to_out.0.{kind}")
            state[f"{dst}mlp.fc1.{kind}"] = take(f"{src}ff.net.0.proj.{kind}")
            state[f"{dst}mlp.fc2.{kind}"] = take(f"{src}ff.net.2.{kind}")
    take.check_all_taken("FlexiTextDiT")
    return _load(FlexiTextDiT(config), state, "diffusers PixArt").to(model.device)


# ---- diffusers Wan 2.1 (text-to-video) ------------------------------------------------------

def from_diffusers_wan(model: WanTransformer3DModel, text_len: int = 512, num_frames: int = 20,
                       input_size: int = 60) -> FlexiWan:
    """FlexiWan (native patch size only, float32, same device) with the outputs of a diffusers
    WanTransformer3DModel: forward_text(x, t, encoder_hidden_states, None) equals the diffusers forward.
    num_frames and input_size set the latent shape the sampler draws (any extent runs). The prompt table
    is empty (null row only): fill it with FlexiWan.set_prompts. Only text-to-video Wan 2.1 is supported.
    """
    cfg = model.config
    unsupported = {
        "image_dim": (cfg.image_dim, None),
        "added_kv_proj_dim": (cfg.added_kv_proj_dim, None),
        "pos_embed_seq_len": (cfg.pos_embed_seq_len, None),
        "qk_norm": (cfg.qk_norm, "rms_norm_across_heads"),
    }
    for name, (value, want) in unsupported.items():
        if value != want:
            raise UserError(f"diffusers Wan: config '{name}' is {value!r}; only {want!r} (text-to-video) is supported")
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    out_channels = cfg.out_channels or cfg.in_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise UserError(f"diffusers Wan: config 'out_channels' is {out_channels}, neither in_channels nor 2 x in_channels")
    config = FlexiWanConfig(
        input_size=input_size, num_frames=num_frames, in_channels=cfg.in_channels, hidden_size=hidden,
        depth=cfg.num_layers, num_heads=cfg.num_attention_heads, mlp_ratio=cfg.ffn_dim / hidden,
        patch_size=tuple(cfg.patch_size), learn_sigma=out_channels == 2 * cfg.in_channels, mlp_norm_eps=cfg.eps,
        text_dim=cfg.text_dim, text_len=text_len, freq_dim=cfg.freq_dim, cross_attn_norm=cfg.cross_attn_norm,
    )
    config.check("diffusers Wan")
    take = _Weights(model, "diffusers Wan")
    emb = "condition_embedder."
    state = {
        "x_embedder.proj.weight": take("patch_embedding.weight"),
        "x_embedder.proj.bias": take("patch_embedding.bias"),
        "scale_shift_table": take("scale_shift_table"),
        "deembed.linear.weight": take("proj_out.weight"),
        "deembed.linear.bias": take("proj_out.bias"),
    }
    for kind in ("weight", "bias"):
        state[f"t_embedder.mlp.0.{kind}"] = take(f"{emb}time_embedder.linear_1.{kind}")
        state[f"t_embedder.mlp.2.{kind}"] = take(f"{emb}time_embedder.linear_2.{kind}")
        state[f"t_block.1.{kind}"] = take(f"{emb}time_proj.{kind}")
        state[f"text_embedder.linear_1.{kind}"] = take(f"{emb}text_embedder.linear_1.{kind}")
        state[f"text_embedder.linear_2.{kind}"] = take(f"{emb}text_embedder.linear_2.{kind}")
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."  # the same prefix on both sides
        state[f"{b}scale_shift_table"] = take(f"{b}scale_shift_table")
        for theirs, ours in (("attn1", "attn"), ("attn2", "cross_attn")):
            for n in "qk":
                state[f"{b}{ours}.norm_{n}.weight"] = take(f"{b}{theirs}.norm_{n}.weight")
        for kind in ("weight", "bias"):
            state[f"{b}attn.qkv.{kind}"] = torch.cat([take(f"{b}attn1.to_{n}.{kind}") for n in "qkv"])
            state[f"{b}attn.proj.{kind}"] = take(f"{b}attn1.to_out.0.{kind}")
            state[f"{b}cross_attn.q.{kind}"] = take(f"{b}attn2.to_q.{kind}")
            state[f"{b}cross_attn.kv.{kind}"] = torch.cat([take(f"{b}attn2.to_{n}.{kind}") for n in "kv"])
            state[f"{b}cross_attn.proj.{kind}"] = take(f"{b}attn2.to_out.0.{kind}")
            state[f"{b}mlp.fc1.{kind}"] = take(f"{b}ffn.net.0.proj.{kind}")
            state[f"{b}mlp.fc2.{kind}"] = take(f"{b}ffn.net.2.{kind}")
            if cfg.cross_attn_norm:
                state[f"{b}norm2.{kind}"] = take(f"{b}norm2.{kind}")
    take.check_all_taken("FlexiWan")
    return _load(FlexiWan(config), state, "diffusers Wan").to(model.device)


__all__ = ["from_diffusers_dit", "from_diffusers_pixart", "from_diffusers_wan", "from_original_state_dict",
           "infer_original_config", "load_original_checkpoint", "read_checkpoint", "to_diffusers_dit"]
