"""The captions of a text-to-image training set, encoded once by the model's text encoder.

A text encoder (PixArt's T5-XXL, 4.7B parameters) costs more per caption than the DiT step it conditions, and the
same captions come back every epoch, so `PromptCache.build` encodes every distinct caption once, and the empty
caption (the unconditional row, last), and keeps only each caption's real tokens (PixArt's masks are a prefix of
ones; T5 captions average far fewer than the 120 padded tokens) in one float16 safetensors file named by a
fingerprint of the encoder, the padded length and the captions. Rows come back padded with masked zeros.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError
from ..files import save_weights
from .latents import wait_for

Encode = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]  # captions -> (embeds (N, L, C), mask (N, L))


class PromptCache:
    """Encoder states of captions (rows 0..n-1) and the empty caption (row n, `null_row`), read row by row."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), "pt")
            self.text_len = int(self._file.metadata()["text_len"])
            self.offsets = self._file.get_tensor("offsets")
        except Exception as e:  # missing or damaged file
            raise UserError(f"{self.path}: not a usable prompt cache ({type(e).__name__}); delete it to rebuild it") from None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def null_row(self) -> int:
        return len(self) - 1

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (N, text_len, C) float32, mask (N, text_len) float32) of rows idx."""
        tokens = self._file.get_slice("tokens")
        embeds = torch.zeros(len(idx), self.text_len, tokens.get_shape()[1])
        mask = torch.zeros(len(idx), self.text_len)
        for i, row in enumerate(idx.tolist()):
            start, end = int(self.offsets[row]), int(self.offsets[row + 1])
            embeds[i, :end - start] = tokens[start:end].float()
            mask[i, :end - start] = 1
        return embeds, mask

    @classmethod
    def build(cls, captions: Sequence[str], encode: Encode, text_len: int, encoder_key: str, cache_root: str | Path,
              batch_size: int = 64, rank: int = 0, poll_s: float = 1.0) -> PromptCache:
        """The cache of captions for an encoder (encoder_key names it: see training.dit.encoder_key): reused when one
        with the same fingerprint exists under cache_root, else encoded by worker 0 (the others wait for it)."""
        key = hashlib.sha1(json.dumps([encoder_key, text_len, list(captions)]).encode()).hexdigest()[:16]
        path = Path(cache_root) / f"prompts-{key}.safetensors"
        if rank == 0 and not path.is_file():
            texts = [*captions, ""]
            tokens, lengths = [], [0]
            for b in range(0, len(texts), batch_size):
                embeds, mask = encode(texts[b:b + batch_size])
                n = mask.sum(1).long()
                if not torch.equal(mask.bool(), torch.arange(mask.shape[1]) < n[:, None]):
                    raise UserError(f"prompt cache: the text encoder's masks are not a prefix of ones ({encoder_key})")
                tokens += [e[:k].half() for e, k in zip(embeds, n.tolist())]
                lengths += n.tolist()
            offsets = torch.tensor(lengths).cumsum(0)
            save_weights(path, {"tokens": torch.cat(tokens), "offsets": offsets},
                         metadata={"format": "pt", "text_len": str(text_len)})
        wait_for(path.is_file, poll_s)
        return cls(path)


__all__ = ["PromptCache"]
