"""Grouped matmul for MoE experts (`jax.lax.ragged_dot` semantics) as Pallas kernels, with a backward.

    out[r] = lhs[r] @ rhs[g(r)]   for the rows r of group g (groups are consecutive row ranges,
                                  group_sizes[g] rows each); rows past sum(group_sizes) are 0.

Backend: the Triton-style Pallas GPU backend (`pl.pallas_call` + `jax.experimental.pallas.triton`
masked `load`/`store` and `dot`), selected on a GPU by passing `triton.CompilerParams`. It is the
one GPU backend whose kernels run unchanged under `interpret=True` on the CPU, which is how CI
tests them (Mosaic GPU needs a separate prototype interpreter). Its limits shape the design: no
scalar prefetch and no data-dependent BlockSpecs, so the kernels take whole arrays and index them
with group metadata read from small int32 inputs; tiles are powers of 2 >= 16; loops are
`lax.fori_loop` (their bounds may be data-dependent: they lower to scf.for); ragged edges are
masked loads that read 0.

Kernels (M rows, K contraction, N columns, G groups; blocks bm, bk, bn):
- gmm, grid (M/bm, N/bn): each program owns out[m-tile, n-tile] and loops over the groups that
  intersect its rows (metadata computed in XLA: first and one-past-last group per row tile), and
  for each over K in bk chunks, accumulating (lhs rows of that group, others masked to 0) @
  rhs[g] in fp32. A tile that spans several groups pays one K loop per group: at most G - 1 extra
  tile passes in total, as in megablox. Empty groups cost a loop step of zero trip count.
- dlhs = gmm(dout, rhs^T): the same kernel reading rhs[g] transposed tile by tile (no [G, N, K]
  copy of the weights).
- drhs = tgmm, grid (G, K/bk, N/bn): each program owns drhs[g, k-tile, n-tile] and loops over the
  row tiles of group g, accumulating lhs_g^T @ dout_g; an empty group writes zeros.
Every output tile is written by one program: deterministic, no atomics.

Inputs of different dtypes are multiplied in their promoted dtype (bf16 tensor cores for bf16);
the cotangent is cast to it inside the kernel, so an fp32 cotangent of a bf16 product is rounded
to bf16 there (standard mixed precision). fp32 operands use Triton's IEEE fp32 dot (no TF32).

On an H200 (experiments/benchmarks/RESULTS.md, 2026-11-29) the kernels compile, and of the 38
kernel tests run there 37 passed and one was cut by the time limit, none failed. Still to measure: the best bm/bk/bn/num_warps/num_stages at Nemotron 3 Nano
expert shapes and the speed against a baseline (`jax.lax.ragged_dot` ran out of memory at those
shapes; experiments/benchmarks/kernels.py --only gmm).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nemojax.ops.pallas_common import KernelConfig, dot, edge_mask, load_tile, store_tile


@dataclasses.dataclass(frozen=True, kw_only=True)
class GmmConfig(KernelConfig):
    """Tiles: bm rows, bk of the contraction, bn output columns (tgmm: output tiles [bk, bn], bm
    rows a step)."""
    block_m: int = 128
    block_k: int = 64
    block_n: int = 128
    num_stages: int = 3


def group_metadata(group_sizes, m: int, block_m: int):
    """(offsets [G+1], first [M/bm], last [M/bm]): group g holds rows offsets[g]:offsets[g+1];
    row tile i meets groups first[i]..last[i]-1 (none when the tile is past the filled rows)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    starts = jnp.arange(pl.cdiv(m, block_m), dtype=jnp.int32) * block_m
    filled = jnp.minimum(ends[-1], m)
    # first group whose end is past the tile's first row: it is non-empty and holds that row
    first = jnp.searchsorted(ends, starts, side="right").astype(jnp.int32)
    last_row = jnp.minimum(starts + block_m, filled) - 1
    last = jnp.searchsorted(ends, last_row, side="right").astype(jnp.int32) + 1
    return offsets, first, jnp.where(starts < filled, last, first)


def _gmm_kernel(offsets_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref, *, config: GmmConfig,
                transpose_rhs: bool, compute_dtype):
    m, k = lhs_ref.shape
    n = out_ref.shape[1]
    bm, bk, bn = config.block_m, config.block_k, config.block_n
    i, j = pl.program_id(0), pl.program_id(1)
    m0, n0 = i * bm, j * bn
    rows = m0 + jnp.arange(bm)
    n_mask = edge_mask(n0, bn, n)
    num_k = pl.cdiv(k, bk)

    def group_body(g, acc):
        lo, hi = offsets_ref[g], offsets_ref[g + 1]
        in_group = (rows >= lo) & (rows < hi) & (rows < m)
        # 1 if the group meets this row tile, else 0 (empty groups too). Integer arithmetic, not a
        # where() on the comparison: with num_k == 1 jax turns where(c, 1, 0) into a bool->int32
        # convert that the Triton lowering leaves as i1, and the scf.for bounds then fail to verify.
        overlap = jnp.clip(jnp.minimum(hi, m0 + bm) - jnp.maximum(lo, m0), 0, 1)

        def k_body(kk, acc):
            k0 = kk * bk
            k_mask = edge_mask(k0, bk, k)
            a = load_tile(lhs_ref, (pl.ds(m0, bm), pl.ds(k0, bk)), in_group, k_mask).astype(compute_dtype)
            if transpose_rhs:  # rhs [G, N, K]
                b = load_tile(rhs_ref, (g, pl.ds(n0, bn), pl.ds(k0, bk)), n_mask, k_mask)
                return acc + dot(a, b.astype(compute_dtype), trans_b=True)
            b = load_tile(rhs_ref, (g, pl.ds(k0, bk), pl.ds(n0, bn)), k_mask, n_mask)
            return acc + dot(a, b.astype(compute_dtype))

        return lax.fori_loop(0, overlap * num_k, k_body, acc)

    acc = lax.fori_loop(first_ref[i], last_ref[i], group_body, jnp.zeros((bm, bn), jnp.float32))
    store_tile(out_ref, (pl.ds(m0, bm), pl.ds(n0, bn)), acc, edge_mask(m0, bm, m), n_mask)


def _tgmm_kernel(offsets_ref, lhs_ref, dout_ref, out_ref, *, config: GmmConfig, compute_dtype):
    m, k = lhs_ref.shape
    n = dout_ref.shape[1]
    bm, bk, bn = config.block_m, config.block_k, config.block_n
    g, kt, nt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k0, n0 = kt * bk, nt * bn
    k_mask, n_mask = edge_mask(k0, bk, k), edge_mask(n0, bn, n)
    lo, hi = offsets_ref[g], jnp.minimum(offsets_ref[g + 1], m)
    first_tile = lax.div(lo, bm)
    end_tile = jnp.where(hi > lo, lax.div(hi + bm - 1, bm), first_tile)

    def body(t, acc):
        rows = t * bm + jnp.arange(bm)
        in_group = (rows >= lo) & (rows < hi)
        a = load_tile(lhs_ref, (pl.ds(t * bm, bm), pl.ds(k0, bk)), in_group, k_mask)
        d = load_tile(dout_ref, (pl.ds(t * bm, bm), pl.ds(n0, bn)), in_group, n_mask)
        return acc + dot(a.astype(compute_dtype), d.astype(compute_dtype), trans_a=True)

    acc = lax.fori_loop(first_tile, end_tile, body, jnp.zeros((bk, bn), jnp.float32))
    store_tile(out_ref, (g, pl.ds(k0, bk), pl.ds(n0, bn)), acc, k_mask, n_mask)


def _gmm_call(lhs, rhs, meta, config: GmmConfig, *, transpose_rhs, out_dtype, compute_dtype):
    m = lhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    kernel = functools.partial(_gmm_kernel, config=config, transpose_rhs=transpose_rhs, compute_dtype=compute_dtype)
    return config.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
                           grid=(pl.cdiv(m, config.block_m), pl.cdiv(n, config.block_n)),
                           name="gmm_t" if transpose_rhs else "gmm")(*meta, lhs, rhs)


def tgmm(lhs, dout, group_sizes, *, out_dtype=jnp.float32, config: GmmConfig | None = None):
    """Per-group lhs_g^T @ dout_g -> [G, K, N] (zero for empty groups); lhs [M, K], dout [M, N].
    The weight gradient of `gmm`; config: tiles and launch options (None: the `GmmConfig` defaults)."""
    config = (config or GmmConfig()).resolved()
    offsets = group_metadata(group_sizes, lhs.shape[0], config.block_m)[0]
    return _tgmm_call(lhs, dout, offsets, config, out_dtype, jnp.promote_types(lhs.dtype, dout.dtype))


def _tgmm_call(lhs, dout, offsets, config: GmmConfig, out_dtype, compute_dtype):
    k, n, g = lhs.shape[1], dout.shape[1], offsets.shape[0] - 1
    kernel = functools.partial(_tgmm_kernel, config=config, compute_dtype=compute_dtype)
    return config.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
                           grid=(g, pl.cdiv(k, config.block_k), pl.cdiv(n, config.block_n)), name="tgmm")(offsets, lhs, dout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs, rhs, group_sizes, config: GmmConfig, out_dtype):
    return _gmm_fwd(lhs, rhs, group_sizes, config, out_dtype)[0]


def _gmm_fwd(lhs, rhs, group_sizes, config, out_dtype):
    meta = group_metadata(group_sizes, lhs.shape[0], config.block_m)
    out = _gmm_call(lhs, rhs, meta, config, transpose_rhs=False, out_dtype=out_dtype,
                    compute_dtype=jnp.promote_types(lhs.dtype, rhs.dtype))
    return out, (lhs, rhs, meta)


def _gmm_bwd(config, out_dtype, res, dout):
    lhs, rhs, meta = res
    cd = jnp.promote_types(lhs.dtype, rhs.dtype)
    # dlhs: rows = M, contraction over N, output columns over K; the same tiles as the forward
    dlhs = _gmm_call(dout, rhs, meta, config, transpose_rhs=True, out_dtype=lhs.dtype, compute_dtype=cd)
    drhs = _tgmm_call(lhs, dout, meta[0], config, rhs.dtype, cd)  # tiles [bk, bn] of [K, N], bm rows a step
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs, rhs, group_sizes, *, preferred_element_type=jnp.float32, config: GmmConfig | None = None):
    """Drop-in for `jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=...)`.

    lhs [M, K]; rhs [G, K, N]; group_sizes [G] int (rows per group, consecutive from row 0).
    Returns [M, N] in preferred_element_type (None: the promoted input dtype), accumulated in fp32;
    rows past sum(group_sizes) are 0. Differentiable in lhs and rhs (Pallas backward kernels).
    config: tiles and launch options (None: the `GmmConfig` defaults).
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"gmm: lhs must be [M, K] and rhs [G, K, N] with the same K; got lhs {lhs.shape}, "
                         f"rhs {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"gmm: group_sizes must be an integer array of shape [G] = {(rhs.shape[0],)}; "
                         f"got {group_sizes.dtype} {group_sizes.shape}")
    out_dtype = jnp.promote_types(lhs.dtype, rhs.dtype) if preferred_element_type is None \
        else jnp.dtype(preferred_element_type)
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), (config or GmmConfig()).resolved(), out_dtype)


__all__ = ["GmmConfig", "gmm", "group_metadata", "tgmm"]
