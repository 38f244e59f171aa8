"""Named model configurations (`nj.presets.get("nemotron-3-nano-30b-a3b")`); defined in config.py."""

from nemojax.config import PRESETS, get, names

__all__ = ["PRESETS", "get", "names"]
