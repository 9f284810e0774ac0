"""flexisearch: search per-step patch-size schedules for flexible diffusion transformers (FlexiDiT)."""

__version__ = "0.1.0"
