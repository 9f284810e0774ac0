"""From stock diffusers pipelines and model specs to FlexiDiT pipelines: conversion (`flexisearch convert`) and the
loader flexify starts from.

A DiTPipeline becomes a FlexiDiTPipeline and a PixArtAlphaPipeline a FlexiTextDiTPipeline: the transformer converted
exactly (models.convert) with the weak patch sizes added by PI-resize (untrained until flexified); VAE, scheduler,
labels, tokenizer and text encoder kept.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write, read_json
from ..models.dit import FlexiDiT
from ..models.loading import dit_parts, load_model, pixart_parts
from ..models.text_dit import FlexiTextDiT
from .generate import make_scheduler
from .pipeline import FlexiDiTPipeline, FlexiPipeline
from .schedule import SOLVERS
from .text_pipeline import FlexiTextDiTPipeline

STOCK_PIPELINES = ("DiTPipeline", "PixArtAlphaPipeline")


def dit_to_flexi_pipeline(source: str, weak_patch_sizes: Sequence[int] = (4,)) -> FlexiDiTPipeline:
    """A diffusers DiTPipeline (hub id such as facebook/DiT-XL-2-256, or a directory; models.loading.dit_parts) as a
    FlexiDiTPipeline."""
    parts = dit_parts(source)
    if weak_patch_sizes:
        parts["transformer"] = parts["transformer"].with_patch_sizes(tuple(weak_patch_sizes))
    return FlexiDiTPipeline(**parts)


def pixart_to_flexi_pipeline(source: str, weak_patch_sizes: Sequence[int] = (4,)) -> FlexiTextDiTPipeline:
    """A diffusers PixArt-alpha pipeline (hub id such as PixArt-alpha/PixArt-XL-2-256x256, or a directory; missing
    components from the shared PixArt-alpha repository, models.loading.pixart_parts) as a FlexiTextDiTPipeline."""
    parts = pixart_parts(source)
    if weak_patch_sizes:
        parts["transformer"] = parts["transformer"].with_patch_sizes(tuple(weak_patch_sizes))
    return FlexiTextDiTPipeline(**parts)


def convert_pipeline(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                     weak_patch_sizes: Sequence[int] = (4,)) -> FlexiPipeline:
    """A diffusers DiTPipeline or PixArtAlphaPipeline directory -> a FlexiDiT pipeline directory, written next to
    dst_dir and renamed into place; an existing non-empty dst_dir is refused. Fine-tune the weak sizes
    (`flexisearch train flexify`) before searching schedules."""
    src, dst = Path(src_dir), Path(dst_dir)
    index = read_json(src / "model_index.json", "pipeline index")
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in STOCK_PIPELINES:
        raise UserError(f"{src / 'model_index.json'}: describes a {name!r} pipeline, expected one of "
                        f"{', '.join(STOCK_PIPELINES)}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst}: already exists and is not an empty directory")
    convert = dit_to_flexi_pipeline if name == "DiTPipeline" else pixart_to_flexi_pipeline
    pipe = convert(str(src), weak_patch_sizes)
    atomic_write(dst, pipe.save_pretrained)  # renamed onto dst, which is absent or empty
    return pipe


def load_flexi_pipeline(spec: str) -> FlexiPipeline:
    """A model spec as a FlexiDiT pipeline on the CPU, nothing added: embedded:<name> or a model directory (pixel
    space: no VAE, the scheduler of its first solver), a FlexiDiT pipeline directory, or a stock pipeline (dit: or
    pixart:<hub id or directory>, or its directory; converted)."""
    for prefix, convert in (("dit:", dit_to_flexi_pipeline), ("pixart:", pixart_to_flexi_pipeline)):
        if spec.startswith(prefix):
            return convert(spec.split(":", 1)[1], ())
    if (Path(spec) / "model_index.json").is_file():
        index = read_json(Path(spec) / "model_index.json", "pipeline index")
        name = index.get("_class_name") if isinstance(index, dict) else None
        if name == "DiTPipeline":
            return dit_to_flexi_pipeline(spec, ())
        if name == "PixArtAlphaPipeline":
            return pixart_to_flexi_pipeline(spec, ())
        if isinstance(name, list) and name[-1:] == ["FlexiTextDiTPipeline"]:
            return FlexiTextDiTPipeline.from_pretrained(spec)
        return FlexiDiTPipeline.from_pretrained(spec)
    model = load_model(spec)
    cfg = model.config
    scheduler = make_scheduler(SOLVERS[cfg.prediction][0], cfg.prediction, cfg.learn_sigma)
    if isinstance(model, FlexiTextDiT):
        return FlexiTextDiTPipeline(model, scheduler)
    if not isinstance(model, FlexiDiT):
        raise UserError(f"model '{spec}': a {type(model).__name__} has no FlexiDiT pipeline")
    return FlexiDiTPipeline(model, scheduler)


__all__ = ["convert_pipeline", "dit_to_flexi_pipeline", "load_flexi_pipeline", "pixart_to_flexi_pipeline"]
