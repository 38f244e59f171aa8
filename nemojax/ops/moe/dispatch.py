"""Routed relu^2 experts: y_t = sum_k w_tk relu(x_t W_up[e_tk])^2 W_down[e_tk].

Three implementations of the same math, chosen by `implementation=`:
- "dense":   every expert on every token, combined through a one-hot gate (tiny models; the oracle);
- "ragged":  dropless sort-by-expert + grouped matmul (`jax.lax.ragged_dot`) + unsort;
- "batched": tokens scattered into a per-expert buffer [E, C, D], one batched matmul, gathered back.

Optional capacity (static shapes): each expert keeps at most C = ceil(capacity_factor * T * K / E)
assignments, the first ones in (token, k) order, as MaxText and Megatron do; dropped assignments
contribute zero (the token keeps its shared expert and residual).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from nemojax.ops.ffn import relu2

IMPLEMENTATIONS = ("dense", "ragged", "batched")
# Fastest dropless path per backend, measured by experiments/benchmarks/moe_dispatch.py.
DEFAULT = {"cpu": "ragged", "gpu": "ragged", "tpu": "ragged"}


def capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Slots per expert: every token once (dropless) or ceil(factor * T * K / E)."""
    if capacity_factor is None:
        return tokens
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / num_experts)))


def slot_in_expert(indices, num_experts: int):
    """For each assignment [T, K], its 0-based arrival order at its expert, counting in (token, k) order."""
    onehot = jax.nn.one_hot(indices.reshape(-1), num_experts, dtype=jnp.int32)
    return (jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1).reshape(indices.shape)


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


def _batched(x, weights, indices, w_up, w_down, slots, cap):
    t, k = indices.shape
    e, d = w_up.shape[0], x.shape[1]
    kept = slots < cap
    # dropped assignments are written to (and read from) a scratch row past the end of the buffer
    row = jnp.where(kept, indices * cap + slots, e * cap).reshape(-1)
    token_of = jnp.repeat(jnp.arange(t), k)
    buf = jnp.zeros((e * cap + 1, d), x.dtype).at[row].set(x[token_of])[:-1].reshape(e, cap, d)
    h = relu2(jnp.einsum("ecd,edf->ecf", buf, w_up, preferred_element_type=jnp.float32)).astype(x.dtype)
    y_buf = jnp.einsum("ecf,efd->ecd", h, w_down, preferred_element_type=jnp.float32).reshape(e * cap, d)
    y_rows = jnp.concatenate([y_buf, jnp.zeros((1, d), jnp.float32)])[row]
    return jnp.zeros((t, d), jnp.float32).at[token_of].add(y_rows * weights.reshape(-1)[:, None])


def moe_ffn(x, weights, indices, w_up, w_down, *, implementation: str | None = None,
            capacity_factor: float | None = None, return_stats: bool = False):
    """y_t = sum_k weights[t,k] * relu2(x_t @ w_up[e]) @ w_down[e], e = indices[t,k].

    x [T, Din]; weights, indices [T, K]; w_up [E, Din, F]; w_down [E, F, Din]. The weighted sum is
    accumulated in fp32; the result has x's dtype. implementation: "dense" | "ragged" | "batched" | None
    (the backend's measured default). With `return_stats`, also returns {"load": [E] fraction of the
    T*K assignments sent to each expert (before dropping), "dropped_fraction": scalar}.
    """
    impl = implementation or DEFAULT.get(jax.default_backend(), "ragged")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"moe_ffn: implementation must be one of {IMPLEMENTATIONS} or None; got {impl!r}")
    if w_up.shape[1] != x.shape[1] or w_down.shape != (w_up.shape[0], w_up.shape[2], w_up.shape[1]):
        raise ValueError(f"moe_ffn: x {x.shape}, w_up {w_up.shape}, w_down {w_down.shape} must be "
                         "[T, Din], [E, Din, F], [E, F, Din]")
    if capacity_factor is not None and capacity_factor <= 0:
        raise ValueError(f"moe_ffn: capacity_factor must be > 0 or None (dropless); got {capacity_factor}")
    t, k = indices.shape
    e = w_up.shape[0]
    w_up, w_down = w_up.astype(x.dtype), w_down.astype(x.dtype)
    cap = capacity(t, k, e, capacity_factor)
    slots = slot_in_expert(indices, e)
    kept = slots < cap
    if impl == "batched":
        y = _batched(x, weights, indices, w_up, w_down, slots, cap)
    else:
        fn = _dense if impl == "dense" else _ragged
        y = fn(x, jnp.where(kept, weights, 0.0), indices, w_up, w_down)
    y = y.astype(x.dtype)
    if not return_stats:
        return y
    load = jnp.bincount(indices.reshape(-1), length=e).astype(jnp.float32) / (t * k)
    return y, {"load": load, "dropped_fraction": 1.0 - jnp.mean(kept.astype(jnp.float32))}
