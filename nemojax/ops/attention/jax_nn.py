"""Attention through `jax.nn.dot_product_attention` (GQA, a boolean mask), with the mask built
from the same positions as the reference, so cached decode and empty slots behave identically."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.ops.attention.reference import visible_keys


def attention(q, k, v, q_pos, k_pos, sliding_window=None):
    """The contract of `reference.attention` (q, k, v of one dtype)."""
    visible = visible_keys(q_pos, k_pos, sliding_window)
    o = jax.nn.dot_product_attention(q, k, v, mask=visible[:, None])
    # a query that sees no key: jax.nn's softmax spreads it over every (masked) key; ours gives 0
    return jnp.where(visible.any(axis=-1)[:, :, None, None], o, 0).astype(q.dtype)
