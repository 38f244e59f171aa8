"""Causal grouped-query attention by explicit positions (prefill, cached chunks and decode alike),
in plain JAX: the reference the other implementations are tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible_keys(q_pos, k_pos, sliding_window=None):
    """[B, L, S] bool: key j is visible to query i iff k_pos[j] >= 0 (negative marks an empty
    cache slot), k_pos[j] <= q_pos[i], and q_pos[i] - k_pos[j] < sliding_window when a window is set."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    visible = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        visible &= qp - kp < sliding_window
    return visible


def _dot_operands(*xs):
    """XLA's CPU dot has no bf16 x bf16 -> fp32 kernel for every layout (a cached decode step at batch
    > 1 raised UNIMPLEMENTED); a product of two bf16 values is exact in fp32, so upcasting first gives
    the same sums. Other backends take the bf16 operands as they are."""
    if jax.default_backend() != "cpu":
        return xs
    return tuple(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in xs)


def attention(q, k, v, q_pos, k_pos, sliding_window=None):
    """softmax(q k^T / sqrt(Dh) + mask) v with GQA; the mask is `visible_keys`.

    q [B, L, Hq, Dh]; k, v [B, S, Hkv, Dh], Hq % Hkv == 0 (query head i reads kv head i // (Hq/Hkv));
    q_pos [B, L], k_pos [B, S] absolute positions. Scores and softmax in fp32, the probabilities
    rounded to v's dtype for the value product (fp32 accumulation); a query with no visible key
    gives zeros.
    """
    b, l, hq, dh = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, l, hkv, hq // hkv, dh)
    s = jnp.einsum("blkgd,bskd->bkgls", *_dot_operands(qg, k), preferred_element_type=jnp.float32) * dh ** -0.5
    s = jnp.where(visible_keys(q_pos, k_pos, sliding_window)[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    o = jnp.einsum("bkgls,bskd->blkgd", *_dot_operands(p.astype(v.dtype), v), preferred_element_type=jnp.float32)
    return o.reshape(b, l, hq, dh).astype(q.dtype)
