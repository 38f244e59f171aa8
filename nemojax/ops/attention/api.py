"""Attention dispatch: validation and the `implementation=` switch."""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from nemojax.ops.attention import jax_nn, reference
from nemojax.ops.registry import lookup

# name -> function(q, k, v, q_pos, k_pos, sliding_window); a new kernel is one more entry
_BY_NAME = {"xla": reference.attention, "jax_nn": jax_nn.attention}
IMPLEMENTATIONS = tuple(_BY_NAME)


def default_implementation(backend: str | None = None) -> str:
    """What `implementation=None` runs on `backend` (None: jax's default): "xla" on every backend
    until another implementation is measured faster there."""
    del backend  # one answer for all backends until a measurement gives another
    return "xla"


def _check(q, k, v, q_pos, k_pos, sliding_window):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] \
            or q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: q {q.shape} and k/v {k.shape}/{v.shape} must be [B, L, Hq, Dh] / "
                         "[B, S, Hkv, Dh] with Hq % Hkv == 0")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, pos, shape in (("q_pos", q_pos, q.shape[:2]), ("k_pos", k_pos, k.shape[:2])):
        if pos.shape != shape or not jnp.issubdtype(pos.dtype, jnp.integer):
            raise ValueError(f"attention: {name} must be an integer array {list(shape)}; got {pos.dtype} {pos.shape}")
    if sliding_window is not None and (not isinstance(sliding_window, numbers.Integral) or sliding_window < 1):
        raise ValueError(f"attention: sliding_window must be None or an int >= 1; got {sliding_window!r}")


def attention(q, k, v, q_pos, k_pos, sliding_window=None, *, implementation: str | None = None):
    """Causal GQA attention by absolute positions; q [B, L, Hq, Dh]; k, v [B, S, Hkv, Dh] of q's
    dtype, Hq % Hkv == 0; q_pos [B, L], k_pos [B, S] ints (k_pos < 0: an empty cache slot);
    sliding_window: None or the number of positions a query sees (itself included).
    See `reference.attention` for the exact contract.
    implementation: None (`default_implementation()`) | "xla" (the reference) | "jax_nn"
    (`jax.nn.dot_product_attention` with a mask built from the positions)."""
    fn = lookup("attention", _BY_NAME, implementation, default_implementation)
    _check(q, k, v, q_pos, k_pos, sliding_window)
    return fn(q, k, v, q_pos, k_pos, sliding_window)


__all__ = ["IMPLEMENTATIONS", "attention", "default_implementation"]
