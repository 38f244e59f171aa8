"""Fused relu^2 FFN, y = relu(x @ w_up)^2 @ w_down, as Pallas kernels that never write [T, F].

Backend: the Triton-style Pallas GPU backend (`pl.pallas_call` + `jax.experimental.pallas.triton`
masked `load`/`store` and `dot`), selected on a GPU by passing `triton.CompilerParams`. It is the
one GPU backend whose kernels run unchanged under `interpret=True` on the CPU, which is how CI
tests them; Mosaic GPU kernels need a separate, prototype GPU interpreter and have no `dot_general`
lowering. The Triton lowering's limits are respected: every tile is a power of 2 (>= 16, the
smallest `tl.dot` operand), loops are `lax.fori_loop`, and ragged edges (T, F, D not multiples of
their blocks) are handled by masked loads that read 0, never by padding the arrays.

Tiling (T tokens, D model width, F hidden width; blocks bt, bf, bd, bk):
- forward, grid (T/bt, D/bd): each program owns y[t-tile, d-tile] and loops over F tiles; for
  each it computes h = x[t-tile] @ w_up[:, f-tile] (a loop over D in bk chunks), a = relu(h)^2
  rounded to x's dtype (as the reference does), and accumulates a @ w_down[f-tile, d-tile].
- backward (custom_vjp, the intermediate recomputed tile by tile, fp32 accumulation):
  * dx, grid (T/bt, D/bd): per F tile, one loop over D chunks builds both h = x @ w_up and
    da = dy @ w_down^T, then dh = 2 relu(h) da and dx[t, d] += dh @ w_up[d-tile, f-tile]^T;
  * dW, grid (F/bf, D/bd): per token tile the same h and da, then
    dw_up[d-tile, f-tile] += x[t, d-tile]^T dh and dw_down[f-tile, d-tile] += a^T dy[t, d-tile].
  Every output tile is written by exactly one program: deterministic, no atomics.

Cost of not storing [T, F]: the up projection (and, backward, dy @ w_down^T) is recomputed once
per D tile, so the forward does 2TDF (D/bd + 1) FLOPs instead of 4TDF, the backward
2TDF (4 D/bd + 3) instead of 8TDF. With D = 4096 and bd = 128 that is ~16x / ~33x the FLOPs of
XLA's GEMMs: the fused kernel trades arithmetic for the T*F activation memory, and wins on
time only where D/bd is small (narrow models, per-expert FFNs, or bd ~ D).

To check on a GPU (nothing here has run on one): that Triton compiles every kernel at the default
blocks (the CPU tests only lower them to Triton IR), register pressure of the dW kernel (two fp32
accumulators), the best bt/bf/bd/bk/num_warps/num_stages, and speed against the XLA MLP
(experiments/benchmarks/kernels.py --only ffn).

The module also holds the small Pallas helpers shared with nemojax/ops/moe/pallas_gmm.py
(ffn is the lower layer: moe already imports from it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nemojax.ops.pallas_common import (check_blocks, compiler_params, dot, edge_mask, load_tile, resolve_interpret,
                                       store_tile)

# ----------------------------------------------------------------------------- fused FFN


@dataclasses.dataclass(frozen=True)
class FfnBlocks:
    """Tiles: bt tokens, bf hidden units, bd output columns, bk chunks of the D contraction."""
    block_t: int = 64
    block_f: int = 64
    block_d: int = 128
    block_k: int = 64
    num_warps: int = 8  # the dW kernel holds two fp32 accumulators [bd, bf] + [bf, bd]
    num_stages: int = 2
    interpret: bool = False


def _up_tile(x_ref, w_up_ref, t0, f0, bl: FfnBlocks, dy_ref=None, w_down_ref=None):
    """h = x[t-tile] @ w_up[:, f-tile] and, given dy and w_down, da = dy[t-tile] @ w_down[f-tile]^T
    (both [bt, bf] fp32), in one loop over D chunks."""
    t, d = x_ref.shape
    f = w_up_ref.shape[1]
    bt, bf, bk = bl.block_t, bl.block_f, bl.block_k
    cd = x_ref.dtype
    rows, cols = pl.ds(t0, bt), pl.ds(f0, bf)
    t_mask, f_mask = edge_mask(t0, bt, t), edge_mask(f0, bf, f)

    def body(kk, acc):
        k0 = kk * bk
        k_mask = edge_mask(k0, bk, d)
        ks = pl.ds(k0, bk)
        h = acc[0] + dot(load_tile(x_ref, (rows, ks), t_mask, k_mask),
                         load_tile(w_up_ref, (ks, cols), k_mask, f_mask).astype(cd))
        if dy_ref is None:
            return (h,)
        da = acc[1] + dot(load_tile(dy_ref, (rows, ks), t_mask, k_mask).astype(cd),
                          load_tile(w_down_ref, (cols, ks), f_mask, k_mask).astype(cd), trans_b=True)
        return h, da

    zeros = jnp.zeros((bt, bf), jnp.float32)
    return lax.fori_loop(0, pl.cdiv(d, bk), body, (zeros,) if dy_ref is None else (zeros, zeros))


def _row_tile_kernel(x_ref, w_up_ref, w_down_ref, *refs, bl: FfnBlocks):
    """One [token tile, D tile] of y (refs = (y_ref,)) or of dx (refs = (dy_ref, dx_ref)): a loop
    over F tiles that recomputes the up projection of the token tile for each."""
    dy_ref, out_ref = (None, refs[0]) if len(refs) == 1 else refs
    t, d = x_ref.shape
    f = w_up_ref.shape[1]
    bt, bf, bd = bl.block_t, bl.block_f, bl.block_d
    t0, d0 = pl.program_id(0) * bt, pl.program_id(1) * bd
    d_mask = edge_mask(d0, bd, d)

    def body(fi, acc):
        f0 = fi * bf
        f_mask = edge_mask(f0, bf, f)
        if dy_ref is None:  # y += relu(h)^2 @ w_down[f-tile, d-tile]
            (h,) = _up_tile(x_ref, w_up_ref, t0, f0, bl)
            a = jnp.square(jnp.maximum(h, 0.0)).astype(x_ref.dtype)
            w = load_tile(w_down_ref, (pl.ds(f0, bf), pl.ds(d0, bd)), f_mask, d_mask)
            return acc + dot(a, w.astype(x_ref.dtype))
        # dx += (2 relu(h) * (dy @ w_down^T)) @ w_up[d-tile, f-tile]^T
        h, da = _up_tile(x_ref, w_up_ref, t0, f0, bl, dy_ref, w_down_ref)
        dh = (2.0 * jnp.maximum(h, 0.0) * da).astype(x_ref.dtype)
        w = load_tile(w_up_ref, (pl.ds(d0, bd), pl.ds(f0, bf)), d_mask, f_mask)
        return acc + dot(dh, w.astype(x_ref.dtype), trans_b=True)

    acc = lax.fori_loop(0, pl.cdiv(f, bf), body, jnp.zeros((bt, bd), jnp.float32))
    store_tile(out_ref, (pl.ds(t0, bt), pl.ds(d0, bd)), acc, edge_mask(t0, bt, t), d_mask)


def _dw_kernel(x_ref, w_up_ref, w_down_ref, dy_ref, dw_up_ref, dw_down_ref, *, bl: FfnBlocks):
    t, d = x_ref.shape
    f = w_up_ref.shape[1]
    bt, bf, bd = bl.block_t, bl.block_f, bl.block_d
    f0, d0 = pl.program_id(0) * bf, pl.program_id(1) * bd
    f_mask, d_mask = edge_mask(f0, bf, f), edge_mask(d0, bd, d)
    cd = x_ref.dtype

    def body(ti, acc):
        dw_up, dw_down = acc
        t0 = ti * bt
        h, da = _up_tile(x_ref, w_up_ref, t0, f0, bl, dy_ref, w_down_ref)
        relu = jnp.maximum(h, 0.0)
        a = jnp.square(relu).astype(cd)
        dh = (2.0 * relu * da).astype(cd)
        t_mask = edge_mask(t0, bt, t)
        xs = load_tile(x_ref, (pl.ds(t0, bt), pl.ds(d0, bd)), t_mask, d_mask)
        dys = load_tile(dy_ref, (pl.ds(t0, bt), pl.ds(d0, bd)), t_mask, d_mask).astype(cd)
        return dw_up + dot(xs, dh, trans_a=True), dw_down + dot(a, dys, trans_a=True)

    dw_up, dw_down = lax.fori_loop(0, pl.cdiv(t, bt), body, (jnp.zeros((bd, bf), jnp.float32),
                                                            jnp.zeros((bf, bd), jnp.float32)))
    store_tile(dw_up_ref, (pl.ds(d0, bd), pl.ds(f0, bf)), dw_up, d_mask, f_mask)
    store_tile(dw_down_ref, (pl.ds(f0, bf), pl.ds(d0, bd)), dw_down, f_mask, d_mask)


def _call(kernel, grid, out_shape, bl: FfnBlocks, name):
    return pl.pallas_call(functools.partial(kernel, bl=bl), out_shape=out_shape, grid=grid,
                          interpret=bl.interpret, name=name,
                          compiler_params=compiler_params(bl.interpret, bl.num_warps, bl.num_stages))


def _forward(x, w_up, w_down, bl: FfnBlocks):
    t, d = x.shape
    grid = (pl.cdiv(t, bl.block_t), pl.cdiv(d, bl.block_d))
    return _call(_row_tile_kernel, grid, jax.ShapeDtypeStruct((t, d), x.dtype), bl, "relu2_ffn_fwd")(
        x, w_up, w_down)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(x, w_up, w_down, bl: FfnBlocks):
    return _forward(x, w_up, w_down, bl)


def _fused_fwd(x, w_up, w_down, bl):
    return _forward(x, w_up, w_down, bl), (x, w_up, w_down)


def _fused_bwd(bl, res, dy):
    x, w_up, w_down = res
    t, d = x.shape
    f = w_up.shape[1]
    dx = _call(_row_tile_kernel, (pl.cdiv(t, bl.block_t), pl.cdiv(d, bl.block_d)),
               jax.ShapeDtypeStruct(x.shape, x.dtype), bl, "relu2_ffn_dx")(x, w_up, w_down, dy)
    dw_up, dw_down = _call(_dw_kernel, (pl.cdiv(f, bl.block_f), pl.cdiv(d, bl.block_d)),
                           (jax.ShapeDtypeStruct(w_up.shape, w_up.dtype),
                            jax.ShapeDtypeStruct(w_down.shape, w_down.dtype)),
                           bl, "relu2_ffn_dw")(x, w_up, w_down, dy)
    return dx, dw_up, dw_down


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_relu2_ffn(x, w_up, w_down, *, block_t: int = 64, block_f: int = 64, block_d: int = 128,
                    block_k: int = 64, num_warps: int = 8, num_stages: int = 2,
                    interpret: bool | None = None):
    """relu(x @ w_up)^2 @ w_down without biases; x [T, D], w_up [D, F], w_down [F, D].

    Same numerics as `reference.relu2_ffn`: weights used in x's dtype, fp32 accumulation, the
    activation rounded to x's dtype before the down projection, result in x's dtype. Any T, D, F
    (ragged edges are masked). Blocks: powers of 2 >= 16. interpret=None: interpret unless on a GPU.
    Differentiable in x, w_up and w_down (Pallas backward kernels, see the module doc).
    """
    if x.ndim != 2 or w_up.ndim != 2 or w_down.shape != (w_up.shape[1], w_up.shape[0]) \
            or x.shape[1] != w_up.shape[0]:
        raise ValueError(f"fused_relu2_ffn: x, w_up, w_down must be [T, D], [D, F], [F, D]; got "
                         f"{x.shape}, {w_up.shape}, {w_down.shape}")
    check_blocks("fused_relu2_ffn", block_t=block_t, block_f=block_f, block_d=block_d, block_k=block_k)
    bl = FfnBlocks(block_t, block_f, block_d, block_k, num_warps, num_stages, resolve_interpret(interpret))
    return _fused(x, w_up, w_down, bl)


__all__ = ["FfnBlocks", "fused_relu2_ffn"]
