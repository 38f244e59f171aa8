"""Routed relu^2 experts: y_t = sum_k w_tk relu(x_t W_up[e_tk])^2 W_down[e_tk].

Four implementations of the same math, chosen by `implementation=`:
- "dense":   every expert on every token, combined through a one-hot gate (tiny models; the oracle);
- "ragged":  sort assignments by expert + grouped matmul (`jax.lax.ragged_dot`) + unsort;
- "pallas":  "ragged" with the grouped matmul done by the Pallas kernel `pallas_gmm.gmm` (GPU; CPU
             runs it in interpret mode, for tests only);
- "batched": assignments gathered into a per-expert buffer [E, C, D], one batched einsum with the
             [E, D, F] weights, gathered back. Dropless, C must hold the busiest expert's count,
             which is only known at run time: C is the smallest of a few static buckets
             (`DROPLESS_BUCKETS` times the mean load T*K/E, then T) that fits, picked by
             `lax.switch`, which runs only the chosen branch. Balanced routing pays about 1.25x
             the exact FLOPs; a fully collapsed router pays E/K x, the FLOPs of "dense".

Capacity (optional, static shapes): each expert keeps at most C = ceil(capacity_factor * T * K / E)
assignments (clipped to [1, T]), counted over all T tokens of the call. The drop rule is by position:
an expert keeps its first C assignments in token order (a token reaches an expert through at most
one of its K slots, so (token, k) order is token order), as MaxText's cumsum capacity mask and
Megatron's `--moe-token-drop-policy position` do (Megatron's default `probs` policy instead keeps
the highest-weight assignments; MaxText counts capacity per sequence rather than per call). Dropped
assignments contribute zero and the remaining weights are not renormalised; the token keeps its
shared expert and residual, which the caller adds.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from nemojax.ops.ffn import relu2
from nemojax.ops.moe.pallas_gmm import gmm

IMPLEMENTATIONS = ("dense", "ragged", "batched", "pallas")
# implementation=None: the fastest fwd+bwd path measured by experiments/benchmarks/moe_dispatch.py
# (experiments/benchmarks/RESULTS.md). On CPU, ragged_dot is lowered to a masked dense dot over all
# E groups (K times the FLOPs of "dense"), so "batched" wins, dropless (tied with "dense" at E=128)
# and far ahead with a capacity factor. GPU/TPU are unmeasured: "ragged" until the benchmark is run
# there (how XLA lowers ragged_dot varies by backend).
DEFAULT = {"cpu": "batched"}


def default_implementation(backend: str | None = None) -> str:
    return DEFAULT.get(backend or jax.default_backend(), "ragged")


# Dropless "batched" capacity buckets, in units of the mean load T*K/E (T itself is the last one).
# Under sigmoid routing with the correction bias, the busiest expert stays within ~1.2x the mean.
DROPLESS_BUCKETS = (1.25, 2.0)


def capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Slots per expert: every token once (dropless) or ceil(factor * T * K / E), within [1, T]."""
    if capacity_factor is None:
        return tokens
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / num_experts)))


def slot_in_expert(indices, num_experts: int):
    """Each assignment's 0-based arrival rank at its expert [T, K], counting in token order."""
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # stable: each expert's assignments stay in token order
    counts = jnp.bincount(flat, length=num_experts)
    rank_sorted = jnp.arange(flat.shape[0], dtype=flat.dtype) - (jnp.cumsum(counts) - counts)[flat[order]]
    return jnp.zeros_like(flat).at[order].set(rank_sorted.astype(flat.dtype)).reshape(indices.shape)


def _dense(x, weights, indices, w_up, w_down):
    e = w_up.shape[0]
    gate = jnp.sum(jax.nn.one_hot(indices, e, dtype=jnp.float32) * weights[..., None], axis=1)  # [T, E]
    h = relu2(jnp.einsum("td,edf->tef", x, w_up, preferred_element_type=jnp.float32))
    # gating before the down projection contracts (e, f) at once: no [T, E, D] intermediate
    return jnp.einsum("tef,efd->td", (h * gate[..., None]).astype(x.dtype), w_down,
                      preferred_element_type=jnp.float32)


def _combine(y_rows, row, weights):
    """y_t = sum_k w_tk y_rows[row_tk]; row == len(y_rows) (a dropped assignment) reads zero."""
    t, k = weights.shape
    y_assign = jnp.take(y_rows, row, axis=0, mode="fill", fill_value=0)
    return jnp.einsum("tkd,tk->td", y_assign.reshape(t, k, -1), weights.astype(jnp.float32))


def _ragged(x, weights, indices, w_up, w_down, kept, cap, grouped_dot=jax.lax.ragged_dot):
    t, k = indices.shape
    e = w_up.shape[0]
    # Dropped assignments get key E: they sort after every kept one, past the last group.
    key = jnp.where(kept, indices, e).reshape(-1)
    order = jnp.argsort(key, stable=True)
    rows = min(t * k, e * cap)  # static: every kept assignment fits
    order = order[:rows]
    group_sizes = jnp.bincount(key, length=e).astype(jnp.int32)
    xs = x[order // k]
    # ragged_dot leaves rows past the last group unspecified; zero them so that neither they nor
    # their gradients reach anything.
    filled = (jnp.arange(rows) < jnp.sum(group_sizes))[:, None]
    pre = grouped_dot(xs, w_up, group_sizes, preferred_element_type=jnp.float32)
    h = relu2(jnp.where(filled, pre, 0.0)).astype(x.dtype)
    ys = jnp.where(filled, grouped_dot(h, w_down, group_sizes, preferred_element_type=jnp.float32), 0.0)
    # each assignment's sorted row; dropped ones land past the filled rows (zero) or at `rows` (fill)
    row = jnp.full((t * k,), rows, jnp.int32).at[order].set(jnp.arange(rows, dtype=jnp.int32))
    return _combine(ys, row, weights)


def _batched(x, weights, indices, w_up, w_down, kept, slot, cap):
    t, k = indices.shape
    e = w_up.shape[0]
    row = jnp.where(kept, indices * cap + slot, e * cap).reshape(-1)  # e * cap: dropped
    # token in each buffer slot; empty slots read row t, a zero row
    token_in_slot = jnp.full((e * cap,), t, jnp.int32).at[row].set(
        jnp.arange(t * k, dtype=jnp.int32) // k, mode="drop")
    buf = jnp.take(x, token_in_slot, axis=0, mode="fill", fill_value=0).reshape(e, cap, -1)
    h = relu2(jnp.einsum("ecd,edf->ecf", buf, w_up, preferred_element_type=jnp.float32)).astype(x.dtype)
    y_buf = jnp.einsum("ecf,efd->ecd", h, w_down, preferred_element_type=jnp.float32)
    return _combine(y_buf.reshape(e * cap, -1), row, weights)


def _batched_dropless(x, weights, indices, w_up, w_down, slot):
    t, k = indices.shape
    e = w_up.shape[0]
    caps = sorted({capacity(t, k, e, f) for f in DROPLESS_BUCKETS} | {t})
    busiest = jnp.max(slot) + 1  # the largest arrival rank is the busiest expert's count
    bucket = jnp.sum(busiest > jnp.array(caps[:-1]))
    kept = jnp.ones((t, k), bool)
    # Rematerialised branches: under grad, a switch keeps the residuals of every branch, zero-filled
    # for those not taken ([E, T, F] for the T bucket); with remat a branch's residuals are its
    # inputs. Measured on CPU (same process, the nano/16 and hf-bench shapes of moe_dispatch.py):
    # fwd+bwd 1.35x and 1.0x faster, the recomputed forward included.
    branches = [jax.checkpoint(lambda ops, c=c: _batched(*ops, kept, slot, c)) for c in caps]
    return jax.lax.switch(bucket, branches, (x, weights, indices, w_up, w_down))


def moe_ffn(x, weights, indices, w_up, w_down, *, implementation: str | None = None,
            capacity_factor: float | None = None, return_stats: bool = False):
    """y_t = sum_k weights[t,k] * relu2(x_t @ w_up[e]) @ w_down[e], e = indices[t,k], over the kept
    assignments (all of them when dropless; see the module doc for the capacity and drop rule).

    x [T, Din]; weights, indices [T, K]; w_up [E, Din, F]; w_down [E, F, Din]. Matmuls and the
    weighted sum accumulate in fp32; the result has x's dtype. implementation: "dense" | "ragged" |
    "batched" | "pallas" | None (the backend's measured default, `default_implementation`). capacity_factor:
    None (dropless) or > 0. With `return_stats`, returns (y, stats), all fp32: "counts" [E], the
    assignments routed to each expert (before dropping; exact integers), "load" [E] = counts / (T*K),
    and "dropped_fraction", the fraction of the T*K assignments dropped by capacity.
    """
    impl = implementation or default_implementation()
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"moe_ffn: implementation must be one of {IMPLEMENTATIONS} or None; got {impl!r}")
    if w_up.shape[1] != x.shape[1] or w_down.shape != (w_up.shape[0], w_up.shape[2], w_up.shape[1]):
        raise ValueError(f"moe_ffn: x {x.shape}, w_up {w_up.shape}, w_down {w_down.shape} must be "
                         "[T, Din], [E, Din, F], [E, F, Din]")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"moe_ffn: capacity_factor must be > 0 or None (dropless); got {capacity_factor}")
    t, k = indices.shape
    e = w_up.shape[0]
    w_up, w_down = w_up.astype(x.dtype), w_down.astype(x.dtype)
    cap = capacity(t, k, e, capacity_factor)
    slot = slot_in_expert(indices, e) if capacity_factor is not None or impl == "batched" else None
    kept = jnp.ones((t, k), bool) if capacity_factor is None else slot < cap
    if impl == "dense":
        y = _dense(x, jnp.where(kept, weights, 0.0), indices, w_up, w_down)
    elif impl == "ragged":
        y = _ragged(x, weights, indices, w_up, w_down, kept, cap)
    elif impl == "pallas":
        y = _ragged(x, weights, indices, w_up, w_down, kept, cap, grouped_dot=gmm)
    elif capacity_factor is not None:
        y = _batched(x, weights, indices, w_up, w_down, kept, slot, cap)
    else:
        y = _batched_dropless(x, weights, indices, w_up, w_down, slot)
    y = y.astype(x.dtype)
    if not return_stats:
        return y
    return y, routing_stats(indices, e, 1.0 - jnp.mean(kept.astype(jnp.float32)))


def routing_stats(indices, num_experts: int, dropped_fraction) -> dict:
    """The stats `moe_ffn(..., return_stats=True)` returns, for the routing `indices` [T, K]."""
    counts = jnp.bincount(indices.reshape(-1), length=num_experts).astype(jnp.float32)
    return {"counts": counts, "load": counts / indices.size, "dropped_fraction": jnp.asarray(dropped_fraction, jnp.float32)}
