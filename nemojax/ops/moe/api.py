"""Routed experts: validation, capacity dropping and the `implementation=` switch.

    y_t = sum_k w_tk relu2(x_t @ w_up[e_tk]) @ w_down[e_tk]

over the kept assignments (all of them when dropless; the capacity and drop rule are in
dispatch.py's doc). The implementations compute the same math (reference.py, dispatch.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemojax.ops.moe import dispatch
from nemojax.ops.moe.reference import dense_moe
from nemojax.ops.registry import lookup

# name -> function(x, weights, indices, w_up, w_down, *, kept, cap) -> fp32 [T, D] (dispatch.py);
# a new kernel is one more entry
_BY_NAME = {"dense": dense_moe, "ragged": dispatch.ragged, "pallas": dispatch.ragged_pallas,
            "batched": dispatch.batched, "loop": dispatch.loop}
IMPLEMENTATIONS = tuple(_BY_NAME)

# The fastest fwd+bwd dispatch measured by experiments/benchmarks/moe_dispatch.py
# (experiments/benchmarks/RESULTS.md). On CPU XLA lowers ragged_dot to a masked dense dot over all
# E groups (K times the FLOPs of "dense"); "loop" costs the tokens routed, balanced or not. GPU and
# TPU are unmeasured: "ragged" until the benchmark runs there (how XLA lowers ragged_dot varies by
# backend).
_DEFAULT = {"cpu": "loop"}


def default_implementation(backend: str | None = None) -> str:
    """What `implementation=None` runs on `backend` (None: jax's default backend)."""
    return _DEFAULT.get(backend or jax.default_backend(), "ragged")


def expert_ffn(implementation: str | None, op: str = "moe_ffn"):
    """The dispatch function `implementation` names (None: the backend's default); `op` names the
    caller in the error an unknown name raises."""
    return lookup(op, _BY_NAME, implementation, default_implementation)


def check_moe_args(op: str, x, weights, indices, w_up, w_down) -> None:
    """x [T, Din]; weights, indices [T, K]; w_up [E, Din, F]; w_down [E, F, Din]."""
    if x.ndim != 2 or w_up.ndim != 3 or w_up.shape[1] != x.shape[1] or \
            w_down.shape != (w_up.shape[0], w_up.shape[2], w_up.shape[1]):
        raise ValueError(f"{op}: x {x.shape}, w_up {w_up.shape}, w_down {w_down.shape} must be "
                         "[T, Din], [E, Din, F], [E, F, Din]")
    if weights.shape != indices.shape or indices.ndim != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: weights {weights.shape} and indices {indices.shape} must both be "
                         f"[T={x.shape[0]}, K]")


def moe_ffn(x, weights, indices, w_up, w_down, *, implementation: str | None = None,
            capacity_factor: float | None = None, return_stats: bool = False, precision=None, rounding_key=None):
    """The routed experts of the module doc for x [T, Din], weights, indices [T, K], w_up
    [E, Din, F], w_down [E, F, Din]. Matmuls and the weighted sum accumulate in fp32; the result
    has x's dtype. implementation: None (`default_implementation()`) or one of IMPLEMENTATIONS.
    capacity_factor: None (dropless) or > 0. With `return_stats`, returns (y, `routing_stats`).

    precision: None, or a `nemojax.quant.linear.Precision`: low-precision training, both expert GEMMs
    and their gradients on operands quantised with per-expert scales (`grouped_quantized_matmul`);
    `rounding_key` is its backward's key when `precision.needs_key`. Not with "dense", which runs every
    expert on every token and so has no expert's own tokens to scale."""
    fn = expert_ffn(implementation)
    check_moe_args("moe_ffn", x, weights, indices, w_up, w_down)
    if precision is not None:
        if fn is dense_moe:
            raise ValueError("moe_ffn: implementation 'dense' cannot quantise the experts' GEMMs (it runs every "
                             f"expert on every token); with a precision use one of "
                             f"{tuple(n for n in IMPLEMENTATIONS if n != 'dense')}")
        fn = functools.partial(fn, precision=precision, rounding_key=rounding_key)
    t, k = indices.shape
    e = w_up.shape[0]
    cap = dispatch.capacity(t * k, e, capacity_factor, limit=t)
    kept = None if capacity_factor is None else dispatch.arrival_rank(indices, e) < cap
    y = fn(x, weights, indices, w_up.astype(x.dtype), w_down.astype(x.dtype), kept=kept,
           cap=None if capacity_factor is None else cap).astype(x.dtype)
    if not return_stats:
        return y
    dropped = 0.0 if kept is None else 1.0 - jnp.mean(kept.astype(jnp.float32))
    return y, routing_stats(indices, e, dropped)


def routing_stats(indices, num_experts: int, dropped_fraction) -> dict:
    """fp32 stats of the routing `indices` [T, K]: "counts" [E], the assignments routed to each
    expert (before dropping; exact integers), "load" [E] = counts / (T*K), and "dropped_fraction",
    the fraction of the T*K assignments dropped by capacity."""
    counts = jnp.bincount(indices.reshape(-1), length=num_experts).astype(jnp.float32)
    return {"counts": counts, "load": counts / indices.size,
            "dropped_fraction": jnp.asarray(dropped_fraction, jnp.float32)}
