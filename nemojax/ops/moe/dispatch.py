"""Routed relu^2 experts: a dense one-hot path (tiny models, oracle) and a dropless sorted
grouped-matmul path (`jax.lax.ragged_dot`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.ops.ffn import relu2

IMPLEMENTATIONS = ("dense", "ragged")


def _dense(x, weights, indices, w_up, w_down):
    e = w_up.shape[0]
    h = relu2(jnp.einsum("td,edf->tef", x, w_up, preferred_element_type=jnp.float32)).astype(x.dtype)
    y_e = jnp.einsum("tef,efd->ted", h, w_down, preferred_element_type=jnp.float32)
    gate = jnp.sum(jax.nn.one_hot(indices, e, dtype=jnp.float32) * weights[..., None], axis=1)  # [T, E]
    return jnp.einsum("te,ted->td", gate, y_e)


def _ragged(x, weights, indices, w_up, w_down):
    t, k = indices.shape
    e = w_up.shape[0]
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = x[token_of]
    h = relu2(jax.lax.ragged_dot(xs, w_up, group_sizes, preferred_element_type=jnp.float32)).astype(x.dtype)
    ys = jax.lax.ragged_dot(h, w_down, group_sizes, preferred_element_type=jnp.float32)
    ys = ys * weights.reshape(-1)[order][:, None]
    return jnp.zeros((t, x.shape[1]), jnp.float32).at[token_of].add(ys)


def moe_ffn(x, weights, indices, w_up, w_down, *, implementation: str | None = None):
    """y_t = sum_k weights[t,k] * relu2(x_t @ w_up[e]) @ w_down[e], e = indices[t,k].

    x [T, Din]; weights, indices [T, K]; w_up [E, Din, F]; w_down [E, F, Din]. The weighted sum
    is accumulated in fp32; the result has x's dtype. implementation: "dense" | "ragged" | None
    (= "ragged").
    """
    impl = implementation or "ragged"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"moe_ffn: implementation must be one of {IMPLEMENTATIONS} or None; got {impl!r}")
    if w_up.shape[1] != x.shape[1] or w_down.shape != (w_up.shape[0], w_up.shape[2], w_up.shape[1]):
        raise ValueError(f"moe_ffn: x {x.shape}, w_up {w_up.shape}, w_down {w_down.shape} must be "
                         "[T, Din], [E, Din, F], [E, F, Din]")
    fn = _dense if impl == "dense" else _ragged
    return fn(x, weights, indices, w_up.astype(x.dtype), w_down.astype(x.dtype)).astype(x.dtype)
