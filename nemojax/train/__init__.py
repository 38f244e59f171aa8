"""Training: losses, AdamW with schedules and decay masks, the resumable training loop."""

from nemojax.train.config import TrainConfig
from nemojax.train.loop import load_run, train

__all__ = ["TrainConfig", "load_run", "train"]
