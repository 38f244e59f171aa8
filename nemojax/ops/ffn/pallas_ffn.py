"""Fused relu^2 FFN, y = relu(x @ w_up + b_up)^2 @ w_down + b_down, as Pallas kernels that never
write [T, F] (the biases are optional).

Backend: the Triton-style Pallas GPU backend (`pl.pallas_call` + `jax.experimental.pallas.triton`
masked `load`/`store` and `dot`), selected on a GPU by passing `triton.CompilerParams`. It is the
one GPU backend whose kernels run unchanged under `interpret=True` on the CPU, which is how CI
tests them; Mosaic GPU kernels need a separate, prototype GPU interpreter and have no `dot_general`
lowering. The Triton lowering's limits are respected: every tile is a power of 2 (>= 16, the
smallest `tl.dot` operand), loops are `lax.fori_loop`, and ragged edges (T, F, D not multiples of
their blocks) are handled by masked loads that read 0, never by padding the arrays.

Tiling (T tokens, D model width, F hidden width; blocks bt, bf, bd, bk):
- forward, grid (T/bt, D/bd): each program owns y[t-tile, d-tile] and loops over F tiles; for
  each it computes h = x[t-tile] @ w_up[:, f-tile] + b_up[f-tile] (a loop over D in bk chunks),
  a = relu(h)^2 rounded to x's dtype (as the reference does), and accumulates a @ w_down[f-tile,
  d-tile]; b_down[d-tile] is added to the fp32 sum.
- backward (custom_vjp, the intermediate recomputed tile by tile, fp32 accumulation):
  * dx, grid (T/bt, D/bd): per F tile, one loop over D chunks builds both h = x @ w_up and
    da = dy @ w_down^T, then dh = 2 relu(h) da and dx[t, d] += dh @ w_up[d-tile, f-tile]^T;
  * dW, grid (F/bf, D/bd): per token tile the same h and da, then
    dw_up[d-tile, f-tile] += x[t, d-tile]^T dh and dw_down[f-tile, d-tile] += a^T dy[t, d-tile];
    the programs of D tile 0 also write db_up[f-tile] = sum_t dh (fp32, before dh is rounded);
  * db_down = sum_t dy is one XLA reduction.
  Every output tile is written by exactly one program: deterministic, no atomics.

Cost of not storing [T, F]: the up projection (and, backward, dy @ w_down^T) is recomputed once
per D tile, so the forward does 2TDF (D/bd + 1) FLOPs instead of 4TDF, the backward
2TDF (4 D/bd + 3) instead of 8TDF. With D = 4096 and bd = 128 that is ~16x / ~33x the FLOPs of
XLA's GEMMs: the fused kernel trades arithmetic for the T*F activation memory, and wins on
time only where D/bd is small (narrow models, per-expert FFNs, or bd ~ D).

On an H200 (experiments/benchmarks/RESULTS.md, 2026-11-29) the kernels compile and the estimate
above holds: at D = 4096 the fused FFN is far slower than the XLA MLP. At D = 128 its forward wins,
but the backward loses, because the dW grid (F/bf, D/bd) has too few programs to fill the GPU
(8 at F = 512) and each loops over every token: splitting that token loop over the grid is the next
step. Untuned: bt/bf/bd/bk/num_warps/num_stages (experiments/benchmarks/kernels.py --only ffn,ffn_narrow).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nemojax.ops.ffn.reference import check_ffn_args
from nemojax.ops.pallas_common import KernelConfig, dot, edge_mask, load_tile, store_tile

f32 = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class FfnConfig(KernelConfig):
    """Tiles: bt tokens, bf hidden units, bd output columns, bk chunks of the D contraction."""
    block_t: int = 64
    block_f: int = 64
    block_d: int = 128
    block_k: int = 64
    num_warps: int = 8  # the dW kernel holds two fp32 accumulators [bd, bf] + [bf, bd]


def _bias_tile(b_ref, c0, block):
    """[1, block] fp32 slice of a [1, C] bias, 0 past its end."""
    return load_tile(b_ref, (pl.ds(0, 1), pl.ds(c0, block)), None, edge_mask(c0, block, b_ref.shape[1]))


def _up_tile(x_ref, w_up_ref, b_up_ref, t0, f0, config: FfnConfig, dy_ref=None, w_down_ref=None):
    """h = x[t-tile] @ w_up[:, f-tile] + b_up[f-tile] and, given dy and w_down, da = dy[t-tile] @
    w_down[f-tile]^T (both [bt, bf] fp32), in one loop over D chunks."""
    t, d = x_ref.shape
    f = w_up_ref.shape[1]
    bt, bf, bk = config.block_t, config.block_f, config.block_k
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

    zeros = jnp.zeros((bt, bf), f32)
    h, *da = lax.fori_loop(0, pl.cdiv(d, bk), body, (zeros,) if dy_ref is None else (zeros, zeros))
    return (h + _bias_tile(b_up_ref, f0, bf), *da)


def _row_tile_kernel(x_ref, w_up_ref, b_up_ref, w_down_ref, last_ref, out_ref, *, config: FfnConfig,
                     backward: bool):
    """One [token tile, D tile] of y (last_ref = b_down) or, backward, of dx (last_ref = dy): a
    loop over F tiles that recomputes the up projection of the token tile for each."""
    t, d = x_ref.shape
    f = w_up_ref.shape[1]
    bt, bf, bd = config.block_t, config.block_f, config.block_d
    t0, d0 = pl.program_id(0) * bt, pl.program_id(1) * bd
    d_mask = edge_mask(d0, bd, d)

    def body(fi, acc):
        f0 = fi * bf
        f_mask = edge_mask(f0, bf, f)
        if not backward:  # y += relu(h)^2 @ w_down[f-tile, d-tile]
            (h,) = _up_tile(x_ref, w_up_ref, b_up_ref, t0, f0, config)
            a = jnp.square(jnp.maximum(h, 0.0)).astype(x_ref.dtype)
            w = load_tile(w_down_ref, (pl.ds(f0, bf), pl.ds(d0, bd)), f_mask, d_mask)
            return acc + dot(a, w.astype(x_ref.dtype))
        # dx += (2 relu(h) * (dy @ w_down^T)) @ w_up[d-tile, f-tile]^T
        h, da = _up_tile(x_ref, w_up_ref, b_up_ref, t0, f0, config, last_ref, w_down_ref)
        dh = (2.0 * jnp.maximum(h, 0.0) * da).astype(x_ref.dtype)
        w = load_tile(w_up_ref, (pl.ds(d0, bd), pl.ds(f0, bf)), d_mask, f_mask)
        return acc + dot(dh, w.astype(x_ref.dtype), trans_b=True)

    acc = lax.fori_loop(0, pl.cdiv(f, bf), body, jnp.zeros((bt, bd), f32))
    if not backward:
        acc += _bias_tile(last_ref, d0, bd)
    store_tile(out_ref, (pl.ds(t0, bt), pl.ds(d0, bd)), acc, edge_mask(t0, bt, t), d_mask)


def _dw_kernel(x_ref, w_up_ref, b_up_ref, w_down_ref, dy_ref, dw_up_ref, dw_down_ref, db_up_ref, *,
               config: FfnConfig):
    t, d = x_ref.shape
    f = w_up_ref.shape[1]
    bt, bf, bd = config.block_t, config.block_f, config.block_d
    f0, d0 = pl.program_id(0) * bf, pl.program_id(1) * bd
    f_mask, d_mask = edge_mask(f0, bf, f), edge_mask(d0, bd, d)
    cd = x_ref.dtype

    def body(ti, acc):
        dw_up, dw_down, db_up = acc
        t0 = ti * bt
        # rows past T: x and dy read 0, so da = 0 and they add nothing (h there is b_up, not 0)
        h, da = _up_tile(x_ref, w_up_ref, b_up_ref, t0, f0, config, dy_ref, w_down_ref)
        relu = jnp.maximum(h, 0.0)
        a = jnp.square(relu).astype(cd)
        dh = 2.0 * relu * da
        t_mask = edge_mask(t0, bt, t)
        xs = load_tile(x_ref, (pl.ds(t0, bt), pl.ds(d0, bd)), t_mask, d_mask)
        dys = load_tile(dy_ref, (pl.ds(t0, bt), pl.ds(d0, bd)), t_mask, d_mask).astype(cd)
        return (dw_up + dot(xs, dh.astype(cd), trans_a=True), dw_down + dot(a, dys, trans_a=True),
                db_up + jnp.sum(dh, axis=0, keepdims=True))

    dw_up, dw_down, db_up = lax.fori_loop(0, pl.cdiv(t, bt), body, (
        jnp.zeros((bd, bf), f32), jnp.zeros((bf, bd), f32), jnp.zeros((1, bf), f32)))
    store_tile(dw_up_ref, (pl.ds(d0, bd), pl.ds(f0, bf)), dw_up, d_mask, f_mask)
    store_tile(dw_down_ref, (pl.ds(f0, bf), pl.ds(d0, bd)), dw_down, f_mask, d_mask)

    @pl.when(pl.program_id(1) == 0)  # every D tile computes the same db_up: one of them writes it
    def _():
        store_tile(db_up_ref, (pl.ds(0, 1), pl.ds(f0, bf)), db_up, None, f_mask)


def _row_tiles(x, w_up, b_up, w_down, last, config: FfnConfig, backward: bool):
    t, d = x.shape
    kernel = functools.partial(_row_tile_kernel, config=config, backward=backward)
    return config.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((t, d), x.dtype),
                           grid=(pl.cdiv(t, config.block_t), pl.cdiv(d, config.block_d)),
                           name="relu2_ffn_dx" if backward else "relu2_ffn_fwd")(x, w_up, b_up, w_down, last)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused(x, w_up, b_up, w_down, b_down, config: FfnConfig):
    return _row_tiles(x, w_up, b_up, w_down, b_down, config, backward=False)


def _fused_fwd(x, w_up, b_up, w_down, b_down, config):
    return _fused(x, w_up, b_up, w_down, b_down, config), (x, w_up, b_up, w_down)


def _fused_bwd(config, res, dy):
    x, w_up, b_up, w_down = res
    d, f = w_up.shape
    dx = _row_tiles(x, w_up, b_up, w_down, dy, config, backward=True)
    dw_up, dw_down, db_up = config.pallas_call(
        functools.partial(_dw_kernel, config=config), grid=(pl.cdiv(f, config.block_f), pl.cdiv(d, config.block_d)),
        out_shape=(jax.ShapeDtypeStruct(w_up.shape, w_up.dtype), jax.ShapeDtypeStruct(w_down.shape, w_down.dtype),
                   jax.ShapeDtypeStruct(b_up.shape, f32)),
        name="relu2_ffn_dw")(x, w_up, b_up, w_down, dy)
    return dx, dw_up, db_up, dw_down, jnp.sum(dy.astype(f32), axis=0, keepdims=True)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_relu2_ffn(x, w_up, w_down, b_up=None, b_down=None, *, config: FfnConfig | None = None):
    """relu(x @ w_up + b_up)^2 @ w_down + b_down; x [..., D], w_up [D, F], w_down [F, D], biases
    optional ([F], [D]).

    Same numerics as `reference.relu2_ffn`: weights used in x's dtype, fp32 accumulation, biases
    added in fp32, the activation rounded to x's dtype before the down projection, result in x's
    dtype. Any T, D, F (ragged edges are masked). config: tiles and launch options (None: the
    `FfnConfig` defaults). Differentiable in x, the weights and the biases (Pallas backward
    kernels, see the module doc).
    """
    check_ffn_args("fused_relu2_ffn", x, w_up, w_down, b_up, b_down)
    config = (config or FfnConfig()).resolved()
    d, f = w_up.shape
    # absent biases are zeros: one masked load and add per tile, so one set of kernels serves both
    b_up, b_down = (jnp.zeros((1, n), f32) if b is None else b.astype(f32).reshape(1, n)
                    for b, n in ((b_up, f), (b_down, d)))
    y = _fused(x.reshape(-1, d), w_up, b_up, w_down, b_down, config)
    return y.reshape(x.shape)


__all__ = ["FfnConfig", "fused_relu2_ffn"]
