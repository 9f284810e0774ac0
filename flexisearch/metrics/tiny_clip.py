"""A tiny CLIP for 16x16 digits and their measured captions, in transformers' CLIPModel format.

Saved as a standard CLIPModel directory (config.json + model.safetensors) with its processor:
a word-level tokenizer (tokenizers WordLevel wrapped as a PreTrainedTokenizerFast: tokenizer.json)
and a CLIPImageProcessorPil that takes 16x16 single-channel images with values in [0, 255] and
maps them to [-1, 1] (no resize, no crop). Everything loads offline with from_pretrained.

torchmetrics' CLIPScore only accepts hub names it recognises or a callable returning
(model, processor): `clip_score_metric(path)` passes `lambda: load_clip(path)`. With transformers
5, CLIPModel.get_image_features/get_text_features return output objects, while torchmetrics
expects tensors; `TensorCLIP` wraps the model so they return the projected embeddings.

Training (training.clip): symmetric InfoNCE on MNIST-5k train (16x16) and captions.py captions,
with a learnable temperature. Each caption keeps each of its three attributes with probability
1/2 (so "a seven" is in distribution for zero-shot classification), images are shifted by up to
one pixel, and captions that are identical strings within a batch count as joint positives
(many images share a caption).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..files import ASSETS

ASSET = ASSETS / "text" / "clip"
SPECIALS = ("<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>")  # ids 0..3; eos id 3 (not 2: see CLIPTextTransformer)
WORDS = ("a", "an", "the", "of", "digit", "number", "photo", "image", "handwritten", ",", "-", ".",
         "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "thin", "regular", "thick", "left", "slanted", "upright", "right", "small", "mid", "size", "large")
MAX_LENGTH = 16


def build_tokenizer():
    """Word-level tokenizer: lowercase, split on whitespace and punctuation, <|startoftext|> ... <|endoftext|>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate((*SPECIALS, *WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=MAX_LENGTH)


def build_image_processor(channels: int = 1):
    """[0, 255] images (C, H, W tensors or arrays) -> pixel_values in [-1, 1]; no resize or crop."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 127.5,
                                 do_normalize=True, image_mean=[1.0] * channels, image_std=[1.0] * channels,
                                 do_convert_rgb=False)


def tiny_clip_config(vocab_size: int, image_size: int = 16, channels: int = 1, hidden: int = 64, layers: int = 2,
                     heads: int = 4, projection_dim: int = 64):
    from transformers import CLIPConfig

    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads)
    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=MAX_LENGTH, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3, **common),
        vision_config=dict(image_size=image_size, patch_size=4, num_channels=channels, **common),
        projection_dim=projection_dim)


class TensorCLIP(nn.Module):
    """A CLIPModel whose get_image_features/get_text_features return tensors (transformers 5 returns
    output objects); what torchmetrics' CLIPScore needs from the callable route."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    @property
    def config(self):
        return self.clip.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor, **kw) -> torch.Tensor:
        return self._tensor(self.clip.get_image_features(pixel_values=pixel_values, **kw))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        return self._tensor(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kw))

    def forward(self, *args, **kw):
        return self.clip(*args, **kw)


def _quiet():
    from transformers.utils import logging as hf_logging

    class Quiet:
        def __enter__(self):
            self.v, self.b = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()

        def __exit__(self, *exc):
            hf_logging.set_verbosity(self.v)
            if self.b:
                hf_logging.enable_progress_bar()

    return Quiet()


def load_clip(path: str | Path = ASSET) -> tuple[TensorCLIP, object]:
    """(TensorCLIP, CLIPProcessor) from a directory written by save_clip; offline."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
    )

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a CLIP model directory (config.json missing)")
    with _quiet():
        model = CLIPModel.from_pretrained(str(path)).eval()
        processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(str(path)),
                                  tokenizer=AutoTokenizer.from_pretrained(str(path)))
    return TensorCLIP(model).eval(), processor


def save_clip(model, directory: str | Path, channels: int = 1) -> None:
    from transformers import CLIPProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _quiet():
        model.save_pretrained(str(directory))
        CLIPProcessor(image_processor=build_image_processor(channels), tokenizer=build_tokenizer()).save_pretrained(str(directory))


def clip_score_metric(path: str | Path = ASSET):
    """torchmetrics CLIPScore with this CLIP, through the callable route."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    return CLIPScore(model_name_or_path=lambda: load_clip(path))


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Generated images in [-1, 1] -> float [0, 255] (what the processor takes)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).cpu()


@torch.no_grad()
def per_sample_scores(model: TensorCLIP, processor, images: torch.Tensor, captions: Sequence[str],
                      batch_size: int = 512) -> torch.Tensor:
    """100 * cos(image, caption) per pair (before CLIPScore's clamp of the mean at 0); images in [-1, 1]."""
    pixels = to_pixels(images)
    out = []
    for i in range(0, len(captions), batch_size):
        imgs = list(pixels[i:i + batch_size])
        px = processor(images=imgs, return_tensors="pt")["pixel_values"]
        tx = processor(text=list(captions[i:i + batch_size]), return_tensors="pt", padding=True)
        a = F.normalize(model.get_image_features(px), dim=-1)
        b = F.normalize(model.get_text_features(tx["input_ids"], tx["attention_mask"]), dim=-1)
        out.append(100 * (a * b).sum(-1))
    return torch.cat(out)


@torch.no_grad()
def zero_shot(model: TensorCLIP, processor, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Index of the best-matching text for every image."""
    px = processor(images=list(to_pixels(images)), return_tensors="pt")["pixel_values"]
    tx = processor(text=list(texts), return_tensors="pt", padding=True)
    a = F.normalize(model.get_image_features(px), dim=-1)
    b = F.normalize(model.get_text_features(tx["input_ids"], tx["attention_mask"]), dim=-1)
    return (a @ b.T).argmax(1)


__all__ = ["ASSET", "TensorCLIP", "build_image_processor", "build_tokenizer", "clip_score_metric", "load_clip",
           "per_sample_scores", "save_clip", "tiny_clip_config", "to_pixels", "zero_shot"]
