"""What every dataset is: `batch(step)` is a pure function of (seed, step, options), so the trainer's
data position is just the step and a resumed run draws exactly the batches it would have drawn.

`batch(step, rows)` returns only some examples of the batch: each process of a multi-process run asks for
the rows its devices hold, and together the processes' rows are the batch one process would draw."""

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

    def batch(self, step: int, rows=None) -> dict:
        """{"inputs": int32 [R, L], "targets": int32 [R, L]} with IGNORE where a target is not scored: the
        examples `rows` (indices into the batch of `step`, default all: R = B) in that order."""
        if rows is None:
            rows = np.arange(self.batch_size)
        rows = np.asarray(rows)
        if (rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer)
                or np.any((rows < 0) | (rows >= self.batch_size))):
            raise ValueError(f"rows must be a 1-d sequence of ints in [0, batch_size={self.batch_size}); got {rows!r}")
        return self.examples(step, rows)

    @abc.abstractmethod
    def examples(self, step: int, rows: np.ndarray) -> dict:
        """`batch(step, rows)` for valid rows."""
