"""Helpers shared by the tests (importable as `testutils`: pyproject's pytest `pythonpath` holds tests/)."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

import jax
import numpy as np


def rel_err(a, ref) -> float:
    """max |a - ref| / max |ref| over every leaf of two matching pytrees (arrays included), in float64."""
    num = den = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(ref), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        num, den = max(num, float(np.max(np.abs(x - y)))), max(den, float(np.max(np.abs(y))))
    return num / den


@contextmanager
def interrupt_at(step: int, sig=signal.SIGINT):
    """Within the block, `nemojax.train.loop.train` receives `sig` while it draws the training batch of
    0-based `step` (the step in flight completes; the run then saves and stops)."""
    from nemojax.train import loop

    make = loop.make_dataset

    class SignalAt:
        def __init__(self, ds):
            self.ds, self.vocab_size, self.tokenizer = ds, ds.vocab_size, ds.tokenizer

        def batch(self, i):
            if i == step:
                os.kill(os.getpid(), sig)
            return self.ds.batch(i)

    loop.make_dataset = lambda tc, split="train": SignalAt(make(tc)) if split == "train" else make(tc, split)
    try:
        yield
    finally:
        loop.make_dataset = make
