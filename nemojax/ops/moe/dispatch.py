"""Routed experts on the rows each expert received: the dispatches `moe_ffn` (api.py) chooses
from, and the pieces they share with expert parallelism (capacity, arrival ranks, gather, combine).

Every dispatch puts each kept (token, k) assignment in one row of a buffer grouped by expert, runs
every expert on its rows, and combines y_t = sum_k w_tk y[row_tk] in fp32:
- "ragged":  rows sorted by expert, one grouped matmul per projection (`jax.lax.ragged_dot`);
             "pallas" is the same with the Pallas kernel `pallas_gmm.gmm` (interpreted on a CPU).
- "batched": a buffer [E, C, D] with C slots per expert and one batched einsum with the [E, D, F]
             weights. With a capacity factor C is the capacity. Dropless, C must hold the busiest
             expert's count, known only at run time: the smallest of a few static buckets
             (`DROPLESS_BUCKETS` times the mean load T*K/E, then T) that fits, chosen by
             `lax.switch`, which runs only that branch. The cost follows the busiest expert: E x
             1.25 mean when balanced, E x T (the FLOPs of "dense") once it exceeds 2x the mean.
- "loop":    each expert's rows padded to whole tiles of m rows (m about the mean load, between
             `MIN_TILE_ROWS` and 64); a loop over the experts runs each on its own tiles, so the cost follows the
             tokens routed (plus at most m - 1 padding rows per expert) however unbalanced the
             router is. Forward
             and backward are written out (`jax.custom_vjp`): the backward reads each expert's
             weights once and keeps no per-tile copies of them. Reverse mode only: forward-mode
             autodiff (jax.jvp, jax.linearize) needs one of the other implementations.

Each takes (x [T, D], weights [T, K], indices [T, K], w_up [E, D, F], w_down [E, F, D]) and
keyword `kept` (bool [T, K], None: every assignment) and `cap` (the capacity: rows an expert may
receive when assignments were dropped by a capacity factor; None: dropless), and returns fp32 [T, D].

Low-precision training (keywords `precision`, a `nemojax.quant.linear.Precision`, and `rounding_key`):
each dispatch pads every expert's rows to whole quantisation blocks (`Precision.row_alignment` rows:
"ragged" in tiles of that many rows, "loop" in tiles of at least that many, "batched" with that many
more slots at most) and runs both GEMMs through `grouped_quantized_matmul` with its own grouped
matmul (`GroupedGemm`: ragged_dot, the Pallas gmm/tgmm, a batched einsum, the loop over tiles), so
every expert's tokens and weight are quantised as tensors of their own, whatever the layout.

Capacity (static shapes): with a capacity factor c each expert keeps at most
C = ceil(c * T * K / E) assignments (within [1, T]), counted over all T tokens of the call. The
drop rule is by position: an expert keeps its first C assignments in token order (a token reaches
an expert through at most one of its K slots, so (token, k) order is token order), as MaxText's
cumsum capacity mask and Megatron's `--moe-token-drop-policy position` do (Megatron's default
`probs` policy keeps the highest-weight assignments instead; MaxText counts capacity per sequence
rather than per call). Dropped assignments contribute zero and the remaining weights are not
renormalised; the token keeps its shared expert and residual, which the caller adds.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from nemojax.ops.ffn import relu2
from nemojax.ops.moe.pallas_gmm import gmm, tgmm
from nemojax.quant.linear import GroupedGemm, grouped_quantized_matmul

# Dropless "batched" capacity buckets, in units of the mean load T*K/E (T itself is the last one).
# Under sigmoid routing with the correction bias, the busiest expert stays within ~1.2x the mean.
DROPLESS_BUCKETS = (1.25, 2.0)


def capacity(assignments: int, groups: int, capacity_factor: float | None, limit: int) -> int:
    """Rows each of `groups` (experts, or the devices holding them) takes from `assignments`
    spread over them: `limit` when dropless (capacity_factor None), else
    ceil(capacity_factor * assignments / groups) within [1, limit]."""
    if capacity_factor is None:
        return limit
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 or None (dropless); got {capacity_factor}")
    return max(1, min(limit, math.ceil(capacity_factor * assignments / groups)))


def arrival_rank(keys, num_keys: int):
    """Each entry's 0-based rank among the entries of `keys` with the same key, in row-major order
    (an assignment's slot at its expert, or in its send buffer to a device). Same shape as keys."""
    flat = keys.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # stable: equal keys stay in order
    counts = jnp.bincount(flat, length=num_keys)
    rank_sorted = jnp.arange(flat.shape[0], dtype=flat.dtype) - (jnp.cumsum(counts) - counts)[flat[order]]
    return jnp.zeros_like(flat).at[order].set(rank_sorted.astype(flat.dtype)).reshape(keys.shape)


def gather_rows(x, row, top_k: int, num_rows: int):
    """The [num_rows, D] buffer whose row[a] holds the token of assignment a = t * top_k + k;
    rows no assignment names are 0 (row[a] >= num_rows: a is not placed)."""
    t = x.shape[0]
    token_in_row = jnp.full((num_rows,), t, jnp.int32).at[row].set(
        jnp.arange(row.shape[0], dtype=jnp.int32) // top_k, mode="drop")
    return jnp.take(x, token_in_row, axis=0, mode="fill", fill_value=0)


def combine(y_rows, row, weights):
    """y_t = sum_k w_tk y_rows[row_tk] in fp32; row >= len(y_rows) (not placed) reads zero."""
    t, k = weights.shape
    y_assign = jnp.take(y_rows, row, axis=0, mode="fill", fill_value=0)
    return jnp.einsum("tkd,tk->td", y_assign.reshape(t, k, -1), weights.astype(jnp.float32))


def _expert_keys(indices, kept, num_experts: int):
    """Flat [T*K] expert id per assignment, num_experts for one that is not kept."""
    return (indices if kept is None else jnp.where(kept, indices, num_experts)).reshape(-1)


# ------------------------------------------------------------------------------------- ragged
def _ragged_dot(a, b, group_sizes):
    # ragged_dot leaves rows past the last group unspecified; zero them so that neither they nor
    # their gradients reach anything.
    filled = (jnp.arange(a.shape[0]) < jnp.sum(group_sizes))[:, None]
    return jnp.where(filled, lax.ragged_dot(a, b, group_sizes, preferred_element_type=jnp.float32), 0.0)


def _ragged_wgrad(a, g, group_sizes):
    w = jax.ShapeDtypeStruct((group_sizes.shape[0], a.shape[1], g.shape[1]), a.dtype)
    return jax.linear_transpose(lambda b: _ragged_dot(a, b, group_sizes), w)(g)[0]


RAGGED = GroupedGemm(dot=_ragged_dot, wgrad=_ragged_wgrad)
PALLAS = GroupedGemm(dot=gmm, wgrad=tgmm)  # gmm's rows past the last group are 0


def ragged(x, weights, indices, w_up, w_down, *, kept=None, cap=None, gemm=RAGGED, precision=None,
           rounding_key=None):
    t, k = indices.shape
    e = w_up.shape[0]
    key = _expert_keys(indices, kept, e)
    rows = t * k if cap is None else min(t * k, e * cap)  # static: every kept one fits
    if precision is not None:  # each expert's rows padded to whole quantisation blocks
        row, tiles, num_rows = _tiled_rows(key, e, rows, precision.row_alignment)
        ys = _quantized_experts(gather_rows(x, row, k, num_rows), tiles * precision.row_alignment, w_up, w_down,
                                precision, rounding_key, gemm)
        return combine(ys, row, weights)
    order = jnp.argsort(key, stable=True)[:rows]  # the not-kept (key E) sort last
    group_sizes = jnp.bincount(key, length=e).astype(jnp.int32)
    h = relu2(gemm.dot(x[order // k], w_up, group_sizes)).astype(x.dtype)
    ys = gemm.dot(h, w_down, group_sizes)
    # each assignment's sorted row; the not-kept land past the filled rows (zero) or at `rows` (fill)
    row = jnp.full((t * k,), rows, jnp.int32).at[order].set(jnp.arange(rows, dtype=jnp.int32))
    return combine(ys, row, weights)


ragged_pallas = functools.partial(ragged, gemm=PALLAS)


# ------------------------------------------------------------------------------------ batched
def _batched_dot(a, b, group_sizes):
    e = group_sizes.shape[0]
    return jnp.einsum("eck,ekn->ecn", a.reshape(e, -1, a.shape[1]), b,
                      preferred_element_type=jnp.float32).reshape(a.shape[0], -1)


def _batched_wgrad(a, g, group_sizes):
    e = group_sizes.shape[0]
    return jnp.einsum("eck,ecn->ekn", a.reshape(e, -1, a.shape[1]), g.reshape(e, -1, g.shape[1]),
                      preferred_element_type=jnp.float32)


BATCHED = GroupedGemm(dot=_batched_dot, wgrad=_batched_wgrad)  # every group the same size, R / E


def _batched(x, weights, w_up, w_down, key, slot, cap, precision=None, rounding_key=None):
    t, k = weights.shape
    e = w_up.shape[0]
    # quantised: each expert's slots padded to whole quantisation blocks
    slots = cap if precision is None else -(-cap // precision.row_alignment) * precision.row_alignment
    row = jnp.where(key < e, key * slots + slot, e * slots)
    buf = gather_rows(x, row, k, e * slots)
    if precision is not None:
        y_buf = _quantized_experts(buf, jnp.full((e,), slots, jnp.int32), w_up, w_down, precision, rounding_key,
                                   BATCHED)
        return combine(y_buf, row, weights)
    buf = buf.reshape(e, cap, -1)
    h = relu2(jnp.einsum("ecd,edf->ecf", buf, w_up, preferred_element_type=jnp.float32)).astype(x.dtype)
    y_buf = jnp.einsum("ecf,efd->ecd", h, w_down, preferred_element_type=jnp.float32)
    return combine(y_buf.reshape(e * cap, -1), row, weights)


def batched(x, weights, indices, w_up, w_down, *, kept=None, cap=None, precision=None, rounding_key=None):
    t, k = indices.shape
    e = w_up.shape[0]
    key = _expert_keys(indices, kept, e)
    slot = arrival_rank(key, e + 1)
    quantised = (precision, rounding_key)
    if cap is not None:
        return _batched(x, weights, w_up, w_down, key, slot, cap, *quantised)
    caps = sorted({capacity(t * k, e, f, limit=t) for f in DROPLESS_BUCKETS} | {t})
    busiest = jnp.max(jnp.bincount(key, length=e))
    bucket = jnp.sum(busiest > jnp.array(caps[:-1]))
    # Rematerialised branches: under grad, a switch keeps the residuals of every branch, zero-filled
    # for those not taken ([E, T, F] for the T bucket); with remat a branch's residuals are its inputs.
    branches = [jax.checkpoint(lambda ops, c=c: _batched(*ops, key, slot, c, *quantised)) for c in caps]
    return lax.switch(bucket, branches, (x, weights, w_up, w_down))


# --------------------------------------------------------------------------------------- loop
# Tiles of fewer rows than this are bound by reading their expert's weights, not by their FLOPs, so a
# tile is padded up to it (at most to the rows an expert can receive): a decode step's few tokens then
# run each expert's weights once instead of once per row.
MIN_TILE_ROWS = 8


def loop_tile_rows(assignments: int, num_experts: int, max_rows: int | None = None) -> int:
    """Rows per tile of "loop": the mean load T*K/E rounded up to a power of two, at most 64 and at
    least MIN_TILE_ROWS, or the power of two that holds `max_rows` (the most rows one expert can
    receive: T, or the capacity) when that is fewer. At balanced load an expert then runs one or two
    tiles, so the loop's fixed cost per tile is paid rarely, and padding costs at most E * (m - 1)
    rows. (Fixed tiles of 1 to 256 rows were tried on CPU at the training shapes of
    experiments/benchmarks/moe_dispatch.py; the mean-load rule was the best or within the noise of it
    at each.)"""
    mean = max(1, -(-assignments // num_experts))
    floor = MIN_TILE_ROWS if max_rows is None else min(MIN_TILE_ROWS, 1 << (max(1, max_rows) - 1).bit_length())
    return max(floor, min(64, 1 << (mean - 1).bit_length()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _expert_loop_ffn(buf, first_tile, end_tile, w_up, w_down, m: int):
    """relu2(buf[r] @ w_up[e]) @ w_down[e] in fp32 for the rows r of the tiles first_tile[e] to
    end_tile[e] - 1 (m rows each) of every expert e; rows in no expert's tiles are 0."""
    return _expert_loop_fwd(buf, first_tile, end_tile, w_up, w_down, m)[0]


def _expert_loop_fwd(buf, first_tile, end_tile, w_up, w_down, m):
    r, d = buf.shape
    # a loop over the experts that have tiles only: w_up[e] is a copy of the expert's weights (XLA's CPU
    # dot does not read a dynamic slice in place), and a decode step's few tokens reach only some of the
    # experts: copying the others' weights was a large part of a MoE decode step
    active = end_tile > first_tile
    order = jnp.nonzero(active, size=w_up.shape[0], fill_value=0)[0]

    def expert(j, carry):
        e = order[j]
        wu, wd = w_up[e], w_down[e]

        def tile(i, carry):
            y, pre = carry
            p = jnp.dot(lax.dynamic_slice_in_dim(buf, i * m, m), wu, preferred_element_type=jnp.float32)
            yt = jnp.dot(relu2(p).astype(buf.dtype), wd, preferred_element_type=jnp.float32)
            return lax.dynamic_update_slice_in_dim(y, yt, i * m, 0), lax.dynamic_update_slice_in_dim(pre, p, i * m, 0)

        return lax.fori_loop(first_tile[e], end_tile[e], tile, carry)

    init = (jnp.zeros((r, d), jnp.float32), jnp.zeros((r, w_up.shape[2]), jnp.float32))
    y, pre = lax.fori_loop(0, jnp.sum(active), expert, init)
    return y, (buf, first_tile, end_tile, w_up, w_down, pre)


def _expert_loop_bwd(m, res, dy):
    buf, first_tile, end_tile, w_up, w_down, pre = res
    dt = buf.dtype

    def expert(e, carry):
        dx, dw_up, dw_down = carry
        wu, wd = w_up[e], w_down[e]

        def tile(i, carry):
            dx, gu, gd = carry
            xt, p = lax.dynamic_slice_in_dim(buf, i * m, m), lax.dynamic_slice_in_dim(pre, i * m, m)
            dyt = lax.dynamic_slice_in_dim(dy, i * m, m).astype(dt)
            gd = gd + jnp.dot(relu2(p).astype(dt).T, dyt, preferred_element_type=jnp.float32)
            dp = (jnp.dot(dyt, wd.T, preferred_element_type=jnp.float32) * 2 * jnp.maximum(p, 0)).astype(dt)
            gu = gu + jnp.dot(xt.T, dp, preferred_element_type=jnp.float32)
            dxt = jnp.dot(dp, wu.T, preferred_element_type=jnp.float32).astype(dt)
            return lax.dynamic_update_slice_in_dim(dx, dxt, i * m, 0), gu, gd

        init = (dx, jnp.zeros(wu.shape, jnp.float32), jnp.zeros(wd.shape, jnp.float32))
        dx, gu, gd = lax.fori_loop(first_tile[e], end_tile[e], tile, init)
        return dx, dw_up.at[e].set(gu.astype(dw_up.dtype)), dw_down.at[e].set(gd.astype(dw_down.dtype))

    init = (jnp.zeros_like(buf), jnp.zeros_like(w_up), jnp.zeros_like(w_down))
    dx, dw_up, dw_down = lax.fori_loop(0, w_up.shape[0], expert, init)
    return dx, None, None, dw_up, dw_down


_expert_loop_ffn.defvjp(_expert_loop_fwd, _expert_loop_bwd)


def _tiled_rows(key, num_experts: int, placed: int, m: int):
    """(row [T*K], tiles [E], num_rows): each expert's `key`ed assignments (of `placed`) in rows from
    its first tile on, in arrival order, its tiles of m rows following the previous expert's; not
    placed: row num_rows."""
    e = num_experts
    tiles = ((jnp.bincount(key, length=e) + m - 1) // m).astype(jnp.int32)
    first = jnp.cumsum(tiles) - tiles
    num_rows = (placed // m + e) * m  # sum_e ceil(count_e / m) <= placed / m + E tiles
    row = jnp.where(key < e, first[jnp.minimum(key, e - 1)] * m + arrival_rank(key, e + 1), num_rows)
    return row, tiles, num_rows


def _loop_dot(a, b, group_sizes, *, m: int):
    end = jnp.cumsum(group_sizes) // m

    def expert(e, y):
        def tile(i, y):
            yt = jnp.dot(lax.dynamic_slice_in_dim(a, i * m, m), b[e], preferred_element_type=jnp.float32)
            return lax.dynamic_update_slice_in_dim(y, yt, i * m, 0)
        return lax.fori_loop(end[e] - group_sizes[e] // m, end[e], tile, y)

    return lax.fori_loop(0, b.shape[0], expert, jnp.zeros((a.shape[0], b.shape[2]), jnp.float32))


def _loop_wgrad(a, g, group_sizes, *, m: int):
    end = jnp.cumsum(group_sizes) // m

    def expert(e, dw):
        def tile(i, acc):
            return acc + jnp.dot(lax.dynamic_slice_in_dim(a, i * m, m).T, lax.dynamic_slice_in_dim(g, i * m, m),
                                 preferred_element_type=jnp.float32)
        acc = jnp.zeros(dw.shape[1:], jnp.float32)
        return dw.at[e].set(lax.fori_loop(end[e] - group_sizes[e] // m, end[e], tile, acc))

    return lax.fori_loop(0, group_sizes.shape[0], expert,
                         jnp.zeros((group_sizes.shape[0], a.shape[1], g.shape[1]), jnp.float32))


def loop(x, weights, indices, w_up, w_down, *, kept=None, cap=None, precision=None, rounding_key=None):
    t, k = indices.shape
    e = w_up.shape[0]
    key = _expert_keys(indices, kept, e)
    placed = t * k if cap is None else min(t * k, e * cap)
    m = loop_tile_rows(placed, e, t if cap is None else min(t, cap))
    if precision is not None:  # tiles of whole quantisation blocks (both are powers of two)
        m = max(m, precision.row_alignment)
    row, tiles, num_rows = _tiled_rows(key, e, placed, m)
    buf = gather_rows(x, row, k, num_rows)
    if precision is not None:
        gemm = GroupedGemm(dot=functools.partial(_loop_dot, m=m), wgrad=functools.partial(_loop_wgrad, m=m))
        return combine(_quantized_experts(buf, tiles * m, w_up, w_down, precision, rounding_key, gemm), row, weights)
    end = jnp.cumsum(tiles)
    return combine(_expert_loop_ffn(buf, end - tiles, end, w_up, w_down, m), row, weights)


# ---------------------------------------------------------------------------------- quantised
def _quantized_experts(buf, group_sizes, w_up, w_down, precision, rounding_key, gemm: GroupedGemm):
    """relu2(buf[r] @ w_up[e]) @ w_down[e] in fp32 for the rows r of each expert e (consecutive groups of
    group_sizes[e] rows, whole quantisation blocks each), both GEMMs and their gradients quantised per
    `precision` with per-expert scales (`grouped_quantized_matmul`), run by `gemm` on the dispatch's layout."""
    k_up, k_down = jax.random.split(rounding_key) if rounding_key is not None else (None, None)
    pre = grouped_quantized_matmul(buf, w_up, group_sizes, precision, k_up, gemm=gemm)
    h = relu2(pre).astype(buf.dtype)
    return grouped_quantized_matmul(h, w_down, group_sizes, precision, k_down, gemm=gemm)
