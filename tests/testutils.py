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


def rel_l2(a, ref) -> float:
    """||a - ref|| / ||ref|| (Frobenius, float64); `a` must be finite."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(a))
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def closed_form_counts(cfg) -> tuple[int, int]:
    """(total, active) parameters of a ModelConfig from the layer formulas, written out independently of
    the model code (active: routed experts at top_k / num_experts; MTP excluded)."""
    d = cfg.hidden_size
    total = active = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d
    for s in cfg.layers:
        t, a = _layer_counts(s, d)
        total, active = total + t, active + a
    return total, active


def _layer_counts(s, d: int) -> tuple[int, int]:
    """(total, active) of one layer, its pre-norm included; a parallel layer is the sum of its branches."""
    from nemojax.config import AttentionSpec, LinearSpec, MambaSpec, MLPSpec, MoESpec, NoOpSpec, ParallelSpec

    if isinstance(s, ParallelSpec):
        counts = [_layer_counts(b, d) for b in s.branches]
        return sum(t for t, _ in counts), sum(a for _, a in counts)
    n, routed = 0, 0
    if isinstance(s, MambaSpec):
        i, c, h = s.num_heads * s.head_dim, s.conv_dim, s.num_heads
        n = d * (i + c + h) + c * s.conv_kernel + c * s.conv_bias + 3 * h + i + i * d
        n += (i + c + h + d) * s.proj_bias
    elif isinstance(s, AttentionSpec):
        n = 2 * d * s.num_heads * s.head_dim + 2 * d * s.num_kv_heads * s.head_dim
    elif isinstance(s, MLPSpec):
        n = 2 * d * s.intermediate_size + (s.intermediate_size + d) * s.bias
    elif isinstance(s, MoESpec):
        din = s.latent_size or d
        routed = 2 * s.num_experts * din * s.intermediate_size
        n = d * s.num_experts  # router
        if s.shared_intermediate_size:
            n += 2 * d * s.shared_intermediate_size + (s.shared_intermediate_size + d) * s.bias
        if s.latent_size:
            n += 2 * d * din + (din + d) * s.bias
    elif isinstance(s, LinearSpec):
        n = d * d + d * s.bias
    norm = 0 if isinstance(s, NoOpSpec) else d
    return n + routed + norm, n + norm + (routed * s.top_k // s.num_experts if routed else 0)


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


@contextmanager
def compile_cache(path):
    """Within the block, compiled programs are written to and looked up in a persistent cache at `path`.
    `loop.train` jits its steps afresh at every call, so a test that trains, resumes and re-runs one
    configuration would otherwise compile the same programs once per call."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    settings = {"jax_compilation_cache_dir": str(path), "jax_persistent_cache_min_compile_time_secs": 0.0}
    old = {name: getattr(jax.config, name) for name in settings}
    cc.reset_cache()  # the process decided at its first compilation, without a cache dir, to use none
    for name, value in settings.items():
        jax.config.update(name, value)
    try:
        yield
    finally:
        cc.reset_cache()
        for name, value in old.items():
            jax.config.update(name, value)


def chi_square_pvalue(counts, probs, min_expected=5.0):
    """Pearson's goodness of fit, the bins expected to hold fewer than `min_expected` draws pooled."""
    from scipy.stats import chi2

    expected = probs * counts.sum()
    small = expected < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return float(chi2.sf(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]), keep.sum() - 1))
