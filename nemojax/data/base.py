"""What every dataset is: `batch(step)` is a pure function of (seed, step, options), so the trainer's
data position is just the step and a resumed run draws exactly the batches it would have drawn."""

from __future__ import annotations

import abc

import numpy as np

IGNORE = -100  # target of a position that is not scored (the HF convention)


class Dataset(abc.ABC):
    vocab_size: int
    tokenizer = None  # a ByteTokenizer for text datasets

    def __init__(self, *, seq_len: int, batch_size: int, seed: int = 0):
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def rng(self, step: int) -> np.random.Generator:
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step}")
        return np.random.default_rng([self.seed, step])

    @abc.abstractmethod
    def batch(self, step: int) -> dict:
        """{"inputs": int32 [B, L], "targets": int32 [B, L]} with IGNORE where a target is not scored."""
