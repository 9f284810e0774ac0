"""flexisearch: search per-step patch-size schedules for flexible diffusion transformers (FlexiDiT).

The public API, imported lazily (so `import flexisearch` and `flexisearch show` stay fast):

    import flexisearch as fs
    result = fs.search("search_spaces/default.yaml", n_trials=10)   # -> SearchResult
    images = fs.sample(fs.load_model("embedded:flexidit-mnist16-lora"), result.best_schedule, [3, 7], [0, 1])

Layers, lowest first (imports only point down): errors, files, validate, data, models, metrics,
sampling, optimize (the search), training, cli. See docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "UserError": "errors",
    "FlexiDiT": "models.dit", "FlexiDiTConfig": "models.dit", "PRESETS": "models.dit",
    "FlexiTextDiT": "models.text_dit", "FlexiTextDiTConfig": "models.text_dit",
    "FlexiVideoDiT": "models.video_dit", "FlexiVideoDiTConfig": "models.video_dit",
    "FlexiWan": "models.wan", "FlexiWanConfig": "models.wan",
    "load_model": "models.loading",
    "Schedule": "sampling.schedule",
    "sample": "sampling.generate", "TrajectoryCache": "sampling.generate",
    "FlexiDiTPipeline": "sampling.pipeline", "FlexiTextDiTPipeline": "sampling.text_pipeline",
    "follow_schedule": "sampling.follow", "convert_pipeline": "sampling.stock",
    "SearchConfig": "optimize.config", "load_search_config": "optimize.config",
    "Evaluator": "optimize.evaluate",
    "SearchResult": "optimize.run", "search": "optimize.run", "export": "optimize.run",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'flexisearch' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
