"""Synthetic sequence tasks of SSM research. Each scores only the positions whose answer the task
determines from the inputs so far (targets elsewhere are IGNORE). A batch is drawn from one random
stream, example after example, so a process that wants some rows draws the batch and keeps them
(generation only, microseconds per example; nothing is read).

- MQAR, multi-query associative recall (Arora et al. 2023, Zoology): key-value pairs, then the keys again
  at power-law-spaced positions; at a queried key the model must emit its value.
- Induction heads (Olsson et al. 2022): a trigger token appears twice; after the second, emit the token
  that followed the first.
- Selective copying (Gu & Dao 2023): data tokens scattered among blanks; after a separator, emit them in order.
"""

from __future__ import annotations

import abc

import numpy as np

from nemojax.data.base import IGNORE, Dataset


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


def _split(seqs: np.ndarray, scored: np.ndarray) -> dict:
    """Full sequences [B, L + 1] and a mask of scored *target* positions [B, L] -> inputs / targets."""
    targets = np.where(scored, seqs[:, 1:], IGNORE)
    return {"inputs": seqs[:, :-1].astype(np.int32), "targets": targets.astype(np.int32)}


class SyntheticTask(Dataset):
    """A task whose batch is drawn whole (`draw(step)`, every example); `batch(step, rows)` keeps the rows."""

    @abc.abstractmethod
    def draw(self, step: int) -> dict:
        """The whole batch of `step`."""

    def examples(self, step, rows):
        return {k: v[rows] for k, v in self.draw(step).items()}


class MQAR(SyntheticTask):
    """Zoology's layout (its `random_non_queries=False` variant, so no filler token can be mistaken for
    a key): distinct keys from [1, V/2), distinct values from [V/2, V), token 0 fills the gaps. Length
    L + 1: k_1 v_1 ... k_N v_N, then the N keys in random order at pair slots drawn with probability
    ~ slot^(power_a - 1) (most queries come soon after the context, a few far away). The target at each
    query key is its value; the value itself never appears after the query, so recall is the only way
    to score (no eliminating values already answered)."""

    def __init__(self, *, num_kv_pairs: int = 8, vocab_size: int = 256, power_a: float = 0.01, **kw):
        super().__init__(**kw)
        n, L = num_kv_pairs, self.seq_len
        _check(isinstance(n, int) and n >= 1, f"num_kv_pairs must be a positive int; got {n!r}")
        _check(4 * n <= L + 1, f"seq_len must be >= 4 * num_kv_pairs - 1 = {4 * n - 1} (context and queries); "
                               f"got seq_len={L}")
        _check(isinstance(vocab_size, int) and vocab_size // 2 - 1 >= n,
               f"vocab_size must be an int >= 2 * num_kv_pairs + 2 = {2 * n + 2} (num_kv_pairs distinct keys "
               f"in [1, vocab_size/2), distinct values in [vocab_size/2, vocab_size)); got {vocab_size!r}")
        _check(power_a > 0, f"power_a must be > 0; got {power_a}")
        self.n, self.vocab_size, self.power_a = n, vocab_size, power_a

    def draw(self, step):
        rng, B, n, V, L = self.rng(step), self.batch_size, self.n, self.vocab_size, self.seq_len
        half = V // 2
        keys = np.stack([rng.choice(np.arange(1, half), n, replace=False) for _ in range(B)])
        values = np.stack([rng.choice(np.arange(half, V), n, replace=False) for _ in range(B)])
        inputs = np.zeros((B, L), np.int32)
        inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2] = keys, values
        slots = (L + 1 - 2 * n) // 2  # the last slot's key sits at L - 1 or L - 2
        p = np.arange(1, slots + 1, dtype=np.float64) ** (self.power_a - 1)
        targets = np.full((B, L), IGNORE, np.int32)
        for b in range(B):
            where = 2 * n + 2 * np.sort(rng.choice(slots, n, replace=False, p=p / p.sum()))
            order = rng.permutation(n)
            inputs[b, where] = keys[b, order]
            # input = the key; target = its value, which the next input does not reveal (it stays 0)
            targets[b, where] = values[b, order]
        return {"inputs": inputs, "targets": targets}


class InductionHeads(SyntheticTask):
    """Random tokens from [0, V - 1) and the trigger V - 1 at a random position p < L - 2 and at input
    position L - 1; the single scored target is the token that followed the first trigger."""

    def __init__(self, *, vocab_size: int = 64, **kw):
        super().__init__(**kw)
        _check(vocab_size >= 3, f"vocab_size must be >= 3; got {vocab_size}")
        _check(self.seq_len >= 4, f"seq_len must be >= 4 for induction; got {self.seq_len}")
        self.vocab_size = vocab_size

    def draw(self, step):
        rng, B, L, V = self.rng(step), self.batch_size, self.seq_len, self.vocab_size
        seqs = rng.integers(0, V - 1, (B, L + 1))
        first = rng.integers(0, L - 2, B)
        seqs[np.arange(B), first] = V - 1
        seqs[:, L - 1] = V - 1
        seqs[:, L] = seqs[np.arange(B), first + 1]
        scored = np.zeros((B, L), bool)
        scored[:, L - 1] = True
        return _split(seqs, scored)


class SelectiveCopy(SyntheticTask):
    """Layout (length L + 1): L - N positions of blanks (0) holding N data tokens from [2, V) at sorted
    random positions, the separator 1, then the N data tokens in order (the scored targets)."""

    def __init__(self, *, num_tokens: int = 8, vocab_size: int = 18, **kw):
        super().__init__(**kw)
        n = num_tokens
        _check(isinstance(n, int) and n >= 1, f"num_tokens must be a positive int; got {n!r}")
        _check(self.seq_len >= 2 * n, f"seq_len must be >= 2 * num_tokens = {2 * n}; got {self.seq_len}")
        _check(vocab_size >= 3, f"vocab_size must be >= 3 (blank, separator, data); got {vocab_size}")
        self.n, self.vocab_size = n, vocab_size

    def draw(self, step):
        rng, B, L, n, V = self.rng(step), self.batch_size, self.seq_len, self.n, self.vocab_size
        region = L - n
        data = rng.integers(2, V, (B, n))
        seqs = np.zeros((B, L + 1), np.int64)
        for b in range(B):
            seqs[b, np.sort(rng.choice(region, n, replace=False))] = data[b]
        seqs[:, region] = 1
        seqs[:, region + 1:] = data
        scored = np.zeros((B, L), bool)
        scored[:, region:] = True  # inputs from the separator on predict the data tokens
        return _split(seqs, scored)
