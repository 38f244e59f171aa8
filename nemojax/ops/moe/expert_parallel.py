"""Expert-parallel routed experts: experts split over a mesh axis, token assignments exchanged by all-to-all.

Each device holds a slice of the tokens and E / n of the experts (n = size of the expert axis). Per
device: its (token, k) assignments are packed into a static send buffer with `capacity` rows per
destination device, one all-to-all delivers every row to the device holding its expert, the local
experts run on the received rows through the same `implementation=` switch as `moe_ffn` (a dropless
call with one assignment per received row), a second all-to-all returns the results to their
source rows, and the router weights combine them per token.

Drop rule: a device ranks its assignments to each destination device in (token, k) order; those
ranked >= `capacity` are dropped (contribute 0; the kept weights are not renormalised). The default
capacity (capacity_factor=None) is every local assignment, so nothing is ever dropped and the
result equals `moe_ffn`; capacity_factor=c sets capacity = ceil(c * T_local * K / n), i.e. c times
the balanced load. The capacity is pooled over a destination's E / n experts (one buffer per device
pair), so it drops no more than a per-expert capacity of ceil(c * T_local * K / E) would.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nemojax.ops.moe.api import check_moe_args, expert_ffn
from nemojax.ops.moe.dispatch import arrival_rank, capacity, combine, gather_rows


def _local_moe(x, weights, indices, w_up, w_down, *, fn, axis: str, n: int, cap: int, token_axes):
    """One device's share: x [T, D] local tokens, w_up [E/n, D, F] / w_down [E/n, F, D] local experts."""
    t, k = indices.shape
    e_local = w_up.shape[0]
    expert = indices.reshape(-1)
    dest = expert // e_local
    rank = arrival_rank(dest, n)  # among this device's assignments to the same destination
    kept = rank < cap
    slot = jnp.where(kept, dest * cap + rank, n * cap)  # n * cap: not sent
    send_x = gather_rows(x, slot, k, n * cap)
    # Empty slots carry expert id e_local: no local expert takes them.
    send_e = jnp.full((n * cap,), e_local, jnp.int32).at[slot].set(expert % e_local, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True)  # rows [s*c, (s+1)*c) came from device s
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0, tiled=True)[:, None]
    filled = recv_e < e_local
    ys = fn(recv_x, jnp.ones(recv_e.shape, jnp.float32), jnp.minimum(recv_e, e_local - 1), w_up, w_down,
            kept=filled, cap=None)
    # Results travel back in x's dtype (half the traffic under bf16); they are rounded once, before the sum.
    back = jax.lax.all_to_all(ys.astype(x.dtype), axis, 0, 0, tiled=True)
    dropped = jax.lax.psum(jnp.sum(~kept, dtype=jnp.float32), token_axes)
    return combine(back, slot, weights).astype(x.dtype), dropped


def moe_ffn_expert_parallel(x, weights, indices, w_up, w_down, *, mesh, expert_axis: str = "expert",
                            token_axes: tuple[str, ...] | None = None, capacity_factor: float | None = None,
                            implementation: str | None = None, return_dropped: bool = False):
    """`moe_ffn` with the experts split over `mesh`'s `expert_axis` (see the module doc for the drop rule).

    x [T, Din]; weights, indices [T, K]; w_up [E, Din, F]; w_down [E, F, Din]. Tokens are split over
    `token_axes` (default: every mesh axis, which must include `expert_axis`), experts over
    `expert_axis`; inputs laid out otherwise are resharded by the compiler. `implementation` picks
    the local expert computation as in `moe_ffn`. Call it under jax.jit. With `return_dropped`, also
    returns the fraction of all T * K assignments that were dropped.
    """
    fn = expert_ffn(implementation, "moe_ffn_expert_parallel")
    check_moe_args("moe_ffn_expert_parallel", x, weights, indices, w_up, w_down)
    names = tuple(mesh.axis_names)
    token_axes = names if token_axes is None else tuple(token_axes)
    if expert_axis not in names:
        raise ValueError(f"moe_ffn_expert_parallel: expert_axis={expert_axis!r} is not a mesh axis {names}")
    if expert_axis not in token_axes or not set(token_axes) <= set(names):
        raise ValueError(f"moe_ffn_expert_parallel: token_axes={token_axes} must be mesh axes {names} and "
                         f"include expert_axis={expert_axis!r}")
    n = mesh.shape[expert_axis]
    n_tok = math.prod(mesh.shape[a] for a in token_axes)
    if w_up.shape[0] % n:
        raise ValueError(f"moe_ffn_expert_parallel: num_experts={w_up.shape[0]} must be divisible by the "
                         f"mesh's {expert_axis}={n}")
    if x.shape[0] % n_tok:
        raise ValueError(f"moe_ffn_expert_parallel: T={x.shape[0]} tokens must be divisible by the "
                         f"{n_tok} devices of token_axes={token_axes}")
    assignments = indices.shape[0] // n_tok * indices.shape[1]  # one device's
    cap = capacity(assignments, n, capacity_factor, limit=assignments)

    tok, exp = P(token_axes, None), P(expert_axis, None, None)
    # check_vma=False: the Pallas kernels' outputs carry no varying-axes annotation, which the check
    # requires; every collective here is an explicit all_to_all or psum, so there is nothing to infer.
    local = jax.shard_map(lambda *a: _local_moe(*a, fn=fn, axis=expert_axis, n=n, cap=cap, token_axes=token_axes),
                          mesh=mesh, in_specs=(tok, tok, tok, exp, exp), out_specs=(tok, P()), check_vma=False)
    y, dropped = local(x, weights, indices.astype(jnp.int32), w_up.astype(x.dtype), w_down.astype(x.dtype))
    return (y, dropped / indices.size) if return_dropped else y
