"""The shared base of every flexible DiT: growing extra patch sizes, per-size LoRA, the tokenizer front
(patchify, positions, patch-size embedding), identity and save/load.

A subclass builds `x_embedder` (layers.FlexiPatchEmbed), `patch_size_embed`, `pos_embed_<key>` buffers and
`blocks` (each with attn and mlp made of layers.LoRALinear), and says where its de-embedding is
(`_deembed`). Everything else here is written once for the class-conditional, the text and the video model;
a patch size is an int for images and a (t, h, w) tuple for video (layers.size_key names it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from ..files import Pretrained, fingerprint
from .layers import Size, size_key


class FlexibleDiT(Pretrained, nn.Module):
    """Base class: config with patch_size, extra_patch_sizes, lora_rank, lora_alpha, num_classes."""

    config: Any
    is_text_model = False  # FlexiTextDiT: labels are rows of a prompt table
    gradient_checkpointing = False  # a training option: see _block

    def _block(self, block: nn.Module, *args: Any) -> torch.Tensor:
        """Run one transformer block; with gradient_checkpointing, while gradients are recorded, its activations are
        recomputed in the backward pass instead of kept (a block's input is all a training step holds per block)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    @property
    def null_class(self) -> int:
        """The label of the unconditional branch (the null class, or the empty caption's row)."""
        return self.config.num_classes

    def _deembed(self) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def _size(patch_size: Any) -> Size:
        """A patch size as the config holds it (an int; a tuple for video)."""
        return tuple(int(v) for v in patch_size) if isinstance(patch_size, (tuple, list)) else int(patch_size)

    def _like(self, config: Any) -> FlexibleDiT:
        """An empty model of the same class for another config (with_patch_sizes)."""
        return type(self)(config)

    def _init_linears(self) -> None:
        """The start of DiT's and PixArt's init: xavier-uniform linears and patch embedding (as a linear), zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

    def _add_lora(self, key: str) -> None:
        for lin in self._lora_linears():
            lin.add_adapter(key, self.config.lora_rank, self.config.lora_alpha or self.config.lora_rank)

    def merge_lora(self, enabled: bool = True) -> FlexibleDiT:
        """Run each LoRA adapter as one linear with its update merged into a per-size copy of the weight (an
        inference option: a weak step then costs what its FLOPs without LoRA say; outputs equal to rounding)."""
        for lin in self._lora_linears():
            lin.merge = enabled
        return self

    @property
    def lora_merged(self) -> bool:
        return any(lin.merge for lin in self._lora_linears()) and bool(self.config.lora_rank)

    def _lora_linears(self) -> list[nn.Module]:
        return [lin for block in self.blocks for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)]

    def _add_all_lora(self) -> None:
        if self.config.lora_rank:
            for p in self.config.extra_patch_sizes:
                self._add_lora(size_key(p))

    def _tokens(self, x: torch.Tensor, patch_size: Any) -> tuple[torch.Tensor, Any, str | None]:
        """Patchify at a supported size: (tokens with positions and patch-size embedding, p, the key of p's
        LoRA adapters and norms; None at the native size)."""
        p = self.config.patch_size if patch_size is None else self._size(patch_size)
        if p not in self.config.patch_sizes:
            raise ValueError(f"patch size {p} not supported; model has {self.config.patch_sizes}")
        key = size_key(p)
        h = self.x_embedder(x, p) + getattr(self, f"pos_embed_{key}")
        if p == self.config.patch_size:
            return h, p, None
        return h + self.patch_size_embed[key], p, key

    def with_patch_sizes(self, extra: tuple[Any, ...], init_std: float = 0.0, lora_rank: int = 0,
                         lora_alpha: float = 0.0, weak_bias: bool = False, weak_norms: bool = False) -> FlexibleDiT:
        """A copy that also supports the given larger patch sizes (and LoRA for them if lora_rank; the paper's
        options, for configs that have them: separate embed / de-embed biases per extra size if weak_bias,
        per-size norms if weak_norms).

        At init the native path is identical to this model, and a token of an upsampled patch at a
        new size equals the native token of the original patch (PI-resize); init_std adds small
        random weights in the directions the resize cannot reach.
        """
        extra = tuple(self._size(p) for p in extra)
        options = {name: True for name, on in (("weak_bias", weak_bias), ("weak_norms", weak_norms)) if on}
        cfg = dataclasses.replace(self.config,
                                  extra_patch_sizes=tuple(sorted(set(self.config.extra_patch_sizes) | set(extra))),
                                  lora_rank=lora_rank, lora_alpha=lora_alpha, **options)
        new = self._like(cfg)
        _, unexpected = new.load_state_dict(self.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"unexpected weights when adding patch sizes: {unexpected[:3]}")
        with torch.no_grad():
            for p in extra:
                if p in self.config.extra_patch_sizes:
                    continue
                new.x_embedder.add_patch_size(p, init_std)
                new._deembed().add_patch_size(p, init_std)
        return new.to(next(self.parameters()).device)

    def fingerprint(self) -> str:
        """Short content hash of config and weights (float32): schedules record the model they were made for."""
        return fingerprint(self.config.to_dict(), self.state_dict(), torch.float32)
