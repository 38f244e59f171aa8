"""Causal grouped-query attention by explicit positions (prefill, cached chunks and decode alike)."""

from __future__ import annotations

import jax.numpy as jnp


def attention(q, k, v, q_pos, k_pos, sliding_window=None):
    """softmax(q k^T / sqrt(Dh) + mask) v with GQA.

    q [B, L, Hq, Dh]; k, v [B, S, Hkv, Dh], Hq % Hkv == 0 (query head i reads kv head i // (Hq/Hkv));
    q_pos [B, L], k_pos [B, S] absolute positions. Key j is visible to query i iff k_pos[j] >= 0
    (negative marks an empty cache slot), k_pos[j] <= q_pos[i], and q_pos[i] - k_pos[j] <
    sliding_window when a window is set. Softmax in fp32; a query with no visible key gives zeros.
    """
    b, l, hq, dh = q.shape
    hkv = k.shape[2]
    if hq % hkv or k.shape != v.shape or k.shape[0] != b or k.shape[3] != dh:
        raise ValueError(f"attention: q {q.shape} and k/v {k.shape}/{v.shape} must be [B, L, Hq, Dh] / "
                         "[B, S, Hkv, Dh] with Hq % Hkv == 0")
    qg = q.reshape(b, l, hkv, hq // hkv, dh)
    s = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=jnp.float32) * dh ** -0.5
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    visible = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        visible &= qp - kp < sliding_window
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    o = jnp.einsum("bkgls,bskd->blkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, l, hq, dh).astype(q.dtype)
