"""Expert-parallel routed experts: experts split over a mesh axis, token assignments exchanged by all-to-all.

Each device holds a slice of the tokens and E / n of the experts (n = size of the expert axis). Per
device: its (token, k) assignments are packed into a static send buffer with `capacity` rows per
destination device, one all-to-all delivers every row to the device holding its expert, the local
experts run as one grouped matmul (jax.lax.ragged_dot) over the received rows, a second all-to-all
returns the results to their source rows, and the router weights combine them per token.

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

from nemojax.ops.ffn import relu2


def _shard_map(f, *, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):  # jax >= 0.7 (0.10, 0.11)
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def expert_capacity(assignments: int, n_devices: int, capacity_factor: float | None) -> int:
    """Rows per destination device in one device's send buffer (`assignments` = T_local * K)."""
    if capacity_factor is None:
        return assignments
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 or None (dropless); got {capacity_factor}")
    return max(1, min(assignments, math.ceil(capacity_factor * assignments / n_devices)))


def _local_moe(x, weights, indices, w_up, w_down, *, axis: str, n: int, capacity: int, token_axes):
    """One device's share: x [T, D] local tokens, w_up [E/n, D, F] / w_down [E/n, F, D] local experts."""
    t, k = indices.shape
    d = x.shape[1]
    e_local = w_up.shape[0]
    a, c = t * k, capacity
    expert = indices.reshape(-1)
    dest = expert // e_local
    # Rank of each assignment among this device's assignments to the same destination, in (token, k) order.
    order = jnp.argsort(dest, stable=True)
    counts = jnp.bincount(dest, length=n)
    rank_sorted = jnp.arange(a) - (jnp.cumsum(counts) - counts)[dest[order]]
    rank = jnp.zeros((a,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    kept = rank < c
    slot = jnp.where(kept, dest * c + rank, n * c)  # n * c: out of bounds, dropped by the scatters below
    token_of = jnp.arange(a) // k

    send_x = jnp.zeros((n * c, d), x.dtype).at[slot].set(x[token_of], mode="drop")
    # Empty slots carry expert id e_local: they sort after every real row, outside all ragged groups.
    send_e = jnp.full((n * c,), e_local, jnp.int32).at[slot].set(expert % e_local, mode="drop")
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True)  # rows [s*c, (s+1)*c) came from device s
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0, tiled=True)

    by_expert = jnp.argsort(recv_e, stable=True)
    group_sizes = jnp.bincount(recv_e, length=e_local).astype(jnp.int32)
    # ragged_dot leaves the rows past the last group unspecified; zero them before relu2 and after the
    # down projection so that no backend's leftovers (or their gradients) reach a kept row.
    filled = (jnp.arange(n * c) < jnp.sum(group_sizes))[:, None]
    pre = jax.lax.ragged_dot(recv_x[by_expert], w_up, group_sizes, preferred_element_type=jnp.float32)
    h = relu2(jnp.where(filled, pre, 0.0)).astype(x.dtype)
    ys = jnp.where(filled, jax.lax.ragged_dot(h, w_down, group_sizes, preferred_element_type=jnp.float32), 0.0)
    # Results travel back in x's dtype (half the traffic under bf16); they are rounded once, before the sum.
    out = jnp.zeros((n * c, d), x.dtype).at[by_expert].set(ys.astype(x.dtype))
    back = jax.lax.all_to_all(out, axis, 0, 0, tiled=True)

    y_assign = jnp.take(back, slot, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    y = jnp.zeros((t, d), jnp.float32).at[token_of].add(y_assign * weights.reshape(-1, 1).astype(jnp.float32))
    dropped = jax.lax.psum(jnp.sum(~kept, dtype=jnp.float32), token_axes)
    return y.astype(x.dtype), dropped


def moe_ffn_expert_parallel(x, weights, indices, w_up, w_down, *, mesh, expert_axis: str = "expert",
                            token_axes: tuple[str, ...] | None = None, capacity_factor: float | None = None,
                            return_dropped: bool = False):
    """`moe_ffn` with the experts split over `mesh`'s `expert_axis` (see the module doc for the drop rule).

    x [T, Din]; weights, indices [T, K]; w_up [E, Din, F]; w_down [E, F, Din]. Tokens are split over
    `token_axes` (default: every mesh axis, which must include `expert_axis`), experts over
    `expert_axis`; inputs laid out otherwise are resharded by the compiler. Call it under jax.jit.
    With `return_dropped`, also returns the fraction of all T * K assignments that were dropped.
    """
    names = tuple(mesh.axis_names)
    token_axes = names if token_axes is None else tuple(token_axes)
    if expert_axis not in names:
        raise ValueError(f"moe_ffn_expert_parallel: expert_axis={expert_axis!r} is not a mesh axis {names}")
    if expert_axis not in token_axes or not set(token_axes) <= set(names):
        raise ValueError(f"moe_ffn_expert_parallel: token_axes={token_axes} must be mesh axes {names} and "
                         f"include expert_axis={expert_axis!r}")
    if w_up.shape[1] != x.shape[1] or w_down.shape != (w_up.shape[0], w_up.shape[2], w_up.shape[1]):
        raise ValueError(f"moe_ffn_expert_parallel: x {x.shape}, w_up {w_up.shape}, w_down {w_down.shape} must "
                         "be [T, Din], [E, Din, F], [E, F, Din]")
    if weights.shape != indices.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(f"moe_ffn_expert_parallel: weights {weights.shape} and indices {indices.shape} must "
                         f"both be [T={x.shape[0]}, K]")
    n = mesh.shape[expert_axis]
    n_tok = math.prod(mesh.shape[a] for a in token_axes)
    if w_up.shape[0] % n:
        raise ValueError(f"moe_ffn_expert_parallel: num_experts={w_up.shape[0]} must be divisible by the "
                         f"mesh's {expert_axis}={n}")
    if x.shape[0] % n_tok:
        raise ValueError(f"moe_ffn_expert_parallel: T={x.shape[0]} tokens must be divisible by the "
                         f"{n_tok} devices of token_axes={token_axes}")
    t_local, k = indices.shape[0] // n_tok, indices.shape[1]
    capacity = expert_capacity(t_local * k, n, capacity_factor)

    tok, exp = P(token_axes, None), P(expert_axis, None, None)
    fn = _shard_map(lambda *a: _local_moe(*a, axis=expert_axis, n=n, capacity=capacity, token_axes=token_axes),
                    mesh=mesh, in_specs=(tok, tok, tok, exp, exp), out_specs=(tok, P()))
    y, dropped = fn(x, weights, indices.astype(jnp.int32), w_up.astype(x.dtype), w_down.astype(x.dtype))
    return (y, dropped / indices.size) if return_dropped else y
