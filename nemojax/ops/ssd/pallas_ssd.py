"""Pallas kernels for the chunked SSD (Mamba-2), forward and backward, on the Triton backend.

Why the Triton-style backend (`jax.experimental.pallas.triton`): its kernels run *entirely*
under `interpret=True` on the CPU (block specs, in-kernel dots, cumsum, fori_loops, dynamic
ref indexing), which is how CI tests them here; Mosaic GPU's interpret mode is private and
partial. It is deprecated from jax 0.11 (a warning on every lowering) but still present; a
Mosaic GPU port can sit behind the same `api.ssd(..., implementation=)` later.
The kernels respect the Triton lowering's limits: every loaded/stored tile is a power of two
(chunk Q, p- and n-blocks; p and n are zero-padded to powers of two outside), no reverse
cumsum inside a kernel (reverse recurrences are `fori_loop`s counting down, reverse cumsums
are XLA), loops are `lax.fori_loop`. A ref's *block* may have a non-power-of-two extent (the
chunk axis nc of the state-passing kernels, the r = h/g heads of a group) as long as every
access through it is a power-of-two tile; `tests/ops/test_ssd_pallas.py` lowers every kernel
to Triton IR on the CPU (`jax.export` for platform "cuda") to keep that true.

Decomposition (b batch, nc chunks of Q, h heads in g groups of r = h/g, p head dim, n state;
"XLA" = plain jnp between kernels, all O(b*l*h) unless said otherwise):

forward
  XLA   dt, a = dt*A, cs = cumsum(a) per chunk, all fp32 [b, h, L]; per-position weights
        w_in = [seg == seg entering the chunk] exp(cs)  (entering state -> position),
        dout = [seg == seg at chunk end] exp(min(cs_end - cs, 0)) (position -> chunk end),
        w_out = dout * dt, and per-chunk decays g = [no reset in chunk] exp(cs_end) [b, h, nc].
  _cb_kernel            grid (b*nc, g)            CB = C B^T per group, fp32 [b, nc, g, Q, Q]
  _chunk_state_kernel   grid (b*nc, h, p/bp)      st = (x * w_out)^T B, fp32 [b, nc, h, p, n]
  _state_pass_kernel    grid (b, h, p*n/bpn)      fori_loop over chunks: S <- g_c S + st_c;
                                                  writes the state entering each chunk and the final
  _chunk_scan_kernel    grid (b*nc, h, p/bp)      y = (CB o mask o exp(cs_i - cs_j) o dt_j) x
                                                      + w_in o (C S_in^T) + D x
backward (recomputes CB, chunk states and entering states from the inputs; saves nothing else)
  _chunk_state_kernel   (dy * w_in)^T C: what each chunk's y asks of its entering state
  _state_pass_bwd_kernel grid (b, h, p*n/bpn)     fori_loop over chunks in reverse: dS_end(c), dS0,
                                                  and <dS_end(c), S_in(c)> partial sums (for d cs_end)
  _dcb_kernel           grid (b*nc, g)            loops over the r heads of a group:
                                                  dCB = sum_h mask o decay o dt_j o (dy x^T), and per
                                                  head the intra-chunk d a_k = sum_{i >= k > j} T_ij
                                                  as a masked segment sum (no difference of sums)
  _dbc_kernel           grid (b*nc, g, n/bn)      dC = dCB B + sum_h w_in o (dy S_in),
                                                  dB = dCB^T C + sum_h w_out o (x dS_end), and the per
                                                  position terms of d cs from w_in and w_out
  _dx_kernel            grid (b*nc, h, p/bp)      dx, d dt (direct), D-gradient partials
  XLA   sums of the per-block partials (over p-, n- and p*n-blocks; deterministic, no atomics),
        the within-chunk reverse/exclusive cumsums that turn d cs into d a, dD.
Every dot accumulates in fp32 (`preferred_element_type`); operands are in the compute dtype (the
promoted dtype of x, B, C: bf16 stays bf16 on the tensor cores). dt, a, cs, the weights and all
states are fp32; states are rounded to the compute dtype only as dot operands (as mamba_ssm does
with its default state_dtype). Cross-chunk and cross-sequence entries are masked (`where`), never
subtracted, and every exp of a cumsum difference is guarded with min(., 0).

seq_idx (packed variable-length rows): the state resets wherever seq_idx changes between
consecutive positions of a row (`reference.segment_ids`), so nothing crosses a boundary, also
mid-chunk. initial_state is the state before position 0 and so feeds only the first sequence of
a row; the final state is the state after the row's last position, i.e. the final state of the
row's last sequence (as mamba_ssm); a row padded at the end with dt = 0 keeps it.

Index arithmetic past 2^31 elements (read from jax 0.10.2 `_src/pallas/triton/lowering.py`):
a BlockSpec index_map is evaluated in int32 and multiplied by the block size in int32, *per
dimension* (`_eval_index_map`); the flat pointer offset is then built per array as
sum(index_d * stride_d) in int64 when the array is larger than 2^32 bytes, else int32
(`_compute_offsets_from_indices`; int32 then never overflows for >= 2-byte dtypes). Dynamic
in-kernel indices (`ref[c, :]`) go through the same path. So only a single dimension (or a grid
axis) above 2^31 can overflow: the arrays here keep their natural multi-dimensional layouts (the
b*nc grid axis is split back by the index maps, states are [b, nc, h, p*n]), which keeps every
per-dimension index below l, h, p*n or b*nc. The tests export the kernels at l = 2^22,
h = 128, p = 64, n = 128 and check that all bf16 pointers get int64 offsets.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from nemojax.ops.pallas_common import KernelConfig
from nemojax.ops.ssd.reference import segment_ids

f32 = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class SsdConfig(KernelConfig):
    """Tiles: block_p of the head dim p, block_n of the state size n, block_pn of the flattened
    p*n in state passing (each capped at the padded p, n, p*n). Any power of two in interpret mode;
    on a GPU the p- and n-tiles must be >= 16 (checked by `ssd_pallas`, which zero-pads small p
    and n to 16 there)."""
    block_p: int = 64
    block_n: int = 64
    block_pn: int = 256

    min_block = 1


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static shapes, tiles and launch options (hashable: a nondiff argument of the custom_vjp)."""
    b: int
    nc: int  # chunks
    q: int  # chunk size
    h: int
    g: int
    p: int  # padded to a power of two
    n: int  # padded to a power of two
    bp: int
    bn: int
    bpn: int
    launch: SsdConfig

    @property
    def r(self):
        return self.h // self.g

    @property
    def length(self):
        return self.nc * self.q


def _call(config, kernel, name, grid, in_specs, out_specs, out_shape):
    return config.launch.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                                  name=name)


# ---- in-kernel helpers --------------------------------------------------------------------------

def _intra_mask(seg):
    """[Q, Q]: j <= i and j in i's sequence."""
    q = seg.shape[0]
    i = lax.broadcasted_iota(jnp.int32, (q, q), 0)
    j = lax.broadcasted_iota(jnp.int32, (q, q), 1)
    return (j <= i) & (seg[:, None] == seg[None, :])


def _decay(cs):
    """exp(cs_i - cs_j); the difference is > 0 only above the diagonal, which is masked."""
    return jnp.exp(jnp.minimum(cs[:, None] - cs[None, :], 0.0))


# ---- kernels ------------------------------------------------------------------------------------

def _cb_kernel(c_ref, b_ref, cb_ref):
    cb_ref[...] = plt.dot(c_ref[...], b_ref[...], trans_b=True)


def _chunk_state_kernel(x_ref, w_ref, b_ref, st_ref):
    x = x_ref[...]
    xw = (x.astype(f32) * w_ref[...][:, None]).astype(x.dtype)
    st_ref[...] = plt.dot(xw, b_ref[...], trans_a=True)


def _state_pass_kernel(st_ref, g_ref, s0_ref, ent_ref, fin_ref):
    def body(c, s):
        ent_ref[c, :] = s
        return g_ref[c] * s + st_ref[c, :]

    fin_ref[...] = lax.fori_loop(0, st_ref.shape[0], body, s0_ref[...])


def _state_pass_bwd_kernel(ds_ref, g_ref, ent_ref, dfin_ref, dso_ref, ds0_ref, dg_ref):
    nc = ds_ref.shape[0]

    def body(i, d):  # d: gradient w.r.t. the state at the end of chunk c
        c = nc - 1 - i
        dso_ref[c, :] = d
        dg_ref[c] = jnp.sum(d * ent_ref[c, :])
        return g_ref[c] * d + ds_ref[c, :]

    ds0_ref[...] = lax.fori_loop(0, nc, body, dfin_ref[...])


def _chunk_scan_kernel(cb_ref, x_ref, dt_ref, cs_ref, seg_ref, win_ref, c_ref, ent_ref, d_ref, y_ref):
    x = x_ref[...]
    k = jnp.where(_intra_mask(seg_ref[...]), cb_ref[...] * _decay(cs_ref[...]) * dt_ref[...][None, :], 0.0)
    y = plt.dot(k.astype(x.dtype), x)
    y += plt.dot(c_ref[...], ent_ref[...].astype(x.dtype), trans_b=True) * win_ref[...][:, None]
    y += d_ref[...] * x.astype(f32)
    y_ref[...] = y.astype(y_ref.dtype)


def _dcb_kernel(cb_ref, dy_ref, x_ref, dt_ref, cs_ref, seg_ref, dcb_ref, da_ref):
    cb = cb_ref[...]
    mask = _intra_mask(seg_ref[...])
    q = cb.shape[0]
    at_or_after = lax.broadcasted_iota(jnp.int32, (q, q), 0) >= lax.broadcasted_iota(jnp.int32, (q, q), 1)

    def body(k, dcb):
        grad_k = plt.dot(dy_ref[:, k, :], x_ref[:, k, :], trans_b=True)  # dy_i . x_j
        gm = jnp.where(mask, grad_k * _decay(cs_ref[k, :]) * dt_ref[k, :][None, :], 0.0)
        t = gm * cb  # d loss / d log(decay_ij) for the pair (i, j)
        # a_k sits in the decay of every pair j < k <= i: exclusive row cumsum, then the rows i >= k
        before = jnp.cumsum(t, axis=1) - t
        da_ref[k, :] = jnp.sum(jnp.where(at_or_after, before, 0.0), axis=0)
        return dcb + gm

    dcb_ref[...] = lax.fori_loop(0, dy_ref.shape[1], body, jnp.zeros((q, q), f32))


def _dbc_kernel(dcb_ref, b_ref, c_ref, dy_ref, x_ref, ent_ref, dso_ref, win_ref, wout_ref,
                dc_ref, db_ref, f_ref, e_ref):
    bm, cm = b_ref[...], c_ref[...]
    dcb = dcb_ref[...].astype(bm.dtype)

    def body(k, acc):
        dc, db = acc
        t = plt.dot(dy_ref[:, k, :], ent_ref[k].astype(bm.dtype))  # [Q, bn]: dy_i S_in
        win = win_ref[k, :]
        f_ref[k, :] = win * jnp.sum(cm.astype(f32) * t, axis=1)  # dy_i . y_off_i: d cs_i via w_in
        u = plt.dot(x_ref[:, k, :], dso_ref[k].astype(bm.dtype))  # [Q, bn]: x_j dS_end
        wout = wout_ref[k, :]
        e_ref[k, :] = wout * jnp.sum(bm.astype(f32) * u, axis=1)  # <dS_end, term j>: d cs via w_out
        return dc + win[:, None] * t, db + wout[:, None] * u

    init = (plt.dot(dcb, bm), plt.dot(dcb, cm, trans_a=True))
    dc, db = lax.fori_loop(0, dy_ref.shape[1], body, init)
    dc_ref[...] = dc
    db_ref[...] = db


def _dx_kernel(cb_ref, dy_ref, x_ref, dt_ref, cs_ref, seg_ref, dout_ref, b_ref, dso_ref, d_ref,
               dx_ref, ddt_ref, dd_ref):
    dy = dy_ref[...]
    k = jnp.where(_intra_mask(seg_ref[...]), cb_ref[...] * _decay(cs_ref[...]), 0.0)
    dxdt = plt.dot(k.astype(dy.dtype), dy, trans_a=True)  # d loss / d (dt_j x_j)
    dxdt += plt.dot(b_ref[...], dso_ref[...].astype(dy.dtype), trans_b=True) * dout_ref[...][:, None]
    xf, dyf = x_ref[...].astype(f32), dy.astype(f32)
    dx_ref[...] = (dt_ref[...][:, None] * dxdt + d_ref[...] * dyf).astype(dx_ref.dtype)
    ddt_ref[...] = jnp.sum(dxdt * xf, axis=1)
    dd_ref[...] = jnp.sum(dyf * xf, axis=1)


# ---- launches (index maps keep every per-dimension index small; see the module docstring) -------

def _specs(config):
    """BlockSpec factories for the (b*nc, head-or-group, block) grids."""
    nc, q, r = config.nc, config.q, config.r

    def bc(i):
        return i // nc, i % nc

    return dict(
        # [b, L, h, p] tile (Q, bp) of head hh
        x=lambda bp: pl.BlockSpec((None, q, None, bp), lambda i, hh, pb: (*bc(i), hh, pb)),
        # [b, L, g, n] tile (Q, n) of the group of head hh
        bc_of_head=pl.BlockSpec((None, q, None, config.n), lambda i, hh, pb: (*bc(i), hh // r, 0)),
        # [b, h, L] chunk (Q,) of head hh
        pos=pl.BlockSpec((None, None, q), lambda i, hh, pb: (i // nc, hh, i % nc)),
        seg=pl.BlockSpec((None, q), lambda i, hh, pb: (i // nc, i % nc)),
        cb_of_head=pl.BlockSpec((None, None, None, q, q), lambda i, hh, pb: (*bc(i), hh // r, 0, 0)),
        state=pl.BlockSpec((None, None, None, config.bp, config.n), lambda i, hh, pb: (*bc(i), hh, pb, 0)),
        d=pl.BlockSpec((None,), lambda i, hh, pb: (hh,)),
        # per-position partial sums [b, h, blocks, L]
        part=pl.BlockSpec((None, None, None, q), lambda i, hh, pb: (i // nc, hh, pb, i % nc)),
        # grid (b*nc, g[, nb]): group-level tiles; heads of group gg are the block gg of size r
        grp_x=pl.BlockSpec((None, q, r, config.p), lambda i, gg, *_: (*bc(i), gg, 0)),
        grp_pos=pl.BlockSpec((None, r, q), lambda i, gg, *_: (i // nc, gg, i % nc)),
        grp_seg=pl.BlockSpec((None, q), lambda i, gg, *_: bc(i)),
        grp_cb=pl.BlockSpec((None, None, None, q, q), lambda i, gg, *_: (*bc(i), gg, 0, 0)),
    )


def _launch_cb(config, C, B):
    spec = pl.BlockSpec((None, config.q, None, config.n), lambda i, gg: (i // config.nc, i % config.nc, gg, 0))
    return _call(config, _cb_kernel, "ssd_cb", (config.b * config.nc, config.g), [spec, spec],
                 pl.BlockSpec((None, None, None, config.q, config.q), lambda i, gg: (i // config.nc, i % config.nc, gg, 0, 0)),
                 jax.ShapeDtypeStruct((config.b, config.nc, config.g, config.q, config.q), f32))(C, B)


def _launch_chunk_state(config, x, w, B):
    s = _specs(config)
    return _call(config, _chunk_state_kernel, "ssd_chunk_state", (config.b * config.nc, config.h, config.p // config.bp),
                 [s["x"](config.bp), s["pos"], s["bc_of_head"]], s["state"],
                 jax.ShapeDtypeStruct((config.b, config.nc, config.h, config.p, config.n), f32))(x, w, B)


def _state_pass_specs(config):
    blk = pl.BlockSpec((None, config.nc, None, config.bpn), lambda bi, hh, k: (bi, 0, hh, k))
    per_chunk = pl.BlockSpec((None, None, config.nc), lambda bi, hh, k: (bi, hh, 0))
    one = pl.BlockSpec((None, None, config.bpn), lambda bi, hh, k: (bi, hh, k))
    return blk, per_chunk, one


def _launch_state_pass(config, st, g, s0):
    blk, per_chunk, one = _state_pass_specs(config)
    pn = config.p * config.n
    return _call(config, _state_pass_kernel, "ssd_state_pass", (config.b, config.h, pn // config.bpn),
                 [blk, per_chunk, one], (blk, one),
                 (jax.ShapeDtypeStruct((config.b, config.nc, config.h, pn), f32), jax.ShapeDtypeStruct((config.b, config.h, pn), f32)),
                 )(st.reshape(config.b, config.nc, config.h, pn), g, s0.reshape(config.b, config.h, pn))


def _launch_state_pass_bwd(config, ds, g, ent, dfinal):
    blk, per_chunk, one = _state_pass_specs(config)
    pn = config.p * config.n
    nblk = pn // config.bpn
    return _call(config, _state_pass_bwd_kernel, "ssd_state_pass_bwd", (config.b, config.h, nblk),
                 [blk, per_chunk, blk, one],
                 (blk, one, pl.BlockSpec((None, None, None, config.nc), lambda bi, hh, k: (bi, hh, k, 0))),
                 (jax.ShapeDtypeStruct((config.b, config.nc, config.h, pn), f32), jax.ShapeDtypeStruct((config.b, config.h, pn), f32),
                  jax.ShapeDtypeStruct((config.b, config.h, nblk, config.nc), f32)),
                 )(ds.reshape(config.b, config.nc, config.h, pn), g, ent, dfinal.reshape(config.b, config.h, pn))


def _launch_chunk_scan(config, cb, x, dt, cs, seg, w_in, C, ent, D):
    s = _specs(config)
    return _call(config, _chunk_scan_kernel, "ssd_chunk_scan", (config.b * config.nc, config.h, config.p // config.bp),
                 [s["cb_of_head"], s["x"](config.bp), s["pos"], s["pos"], s["seg"], s["pos"], s["bc_of_head"],
                  s["state"], s["d"]], s["x"](config.bp),
                 jax.ShapeDtypeStruct(x.shape, x.dtype))(cb, x, dt, cs, seg, w_in, C, ent, D)


def _launch_dcb(config, cb, dy, x, dt, cs, seg):
    s = _specs(config)
    return _call(config, _dcb_kernel, "ssd_dcb", (config.b * config.nc, config.g),
                 [s["grp_cb"], s["grp_x"], s["grp_x"], s["grp_pos"], s["grp_pos"], s["grp_seg"]],
                 (s["grp_cb"], s["grp_pos"]),
                 (jax.ShapeDtypeStruct(cb.shape, f32), jax.ShapeDtypeStruct(dt.shape, f32)))(cb, dy, x, dt, cs, seg)


def _launch_dbc(config, dcb, B, C, dy, x, ent, dso, w_in, w_out):
    s = _specs(config)
    nc, q, r, bn = config.nc, config.q, config.r, config.bn
    nnb = config.n // bn
    bcn = pl.BlockSpec((None, q, None, bn), lambda i, gg, nb: (i // nc, i % nc, gg, nb))
    grp_state = pl.BlockSpec((None, None, r, config.p, bn), lambda i, gg, nb: (i // nc, i % nc, gg, 0, nb))
    grp_part = pl.BlockSpec((None, r, None, q), lambda i, gg, nb: (i // nc, gg, nb, i % nc))
    state5 = (config.b, nc, config.h, config.p, config.n)
    part = jax.ShapeDtypeStruct((config.b, config.h, nnb, config.length), f32)
    return _call(config, _dbc_kernel, "ssd_dbc", (config.b * nc, config.g, nnb),
                 [s["grp_cb"], bcn, bcn, s["grp_x"], s["grp_x"], grp_state, grp_state, s["grp_pos"], s["grp_pos"]],
                 (bcn, bcn, grp_part, grp_part),
                 (jax.ShapeDtypeStruct(B.shape, f32), jax.ShapeDtypeStruct(B.shape, f32), part, part),
                 )(dcb, B, C, dy, x, ent.reshape(state5), dso.reshape(state5), w_in, w_out)


def _launch_dx(config, cb, dy, x, dt, cs, seg, dout, B, dso, D):
    s = _specs(config)
    npb = config.p // config.bp
    part = jax.ShapeDtypeStruct((config.b, config.h, npb, config.length), f32)
    return _call(config, _dx_kernel, "ssd_dx", (config.b * config.nc, config.h, npb),
                 [s["cb_of_head"], s["x"](config.bp), s["x"](config.bp), s["pos"], s["pos"], s["seg"], s["pos"],
                  s["bc_of_head"], s["state"], s["d"]],
                 (s["x"](config.bp), s["part"], s["part"]),
                 (jax.ShapeDtypeStruct(x.shape, x.dtype), part, part),
                 )(cb, dy, x, dt, cs, seg, dout, B, dso.reshape(config.b, config.nc, config.h, config.p, config.n), D)


# ---- the differentiable core --------------------------------------------------------------------

def _weights(config, dt, a, seg):
    """fp32 cumsums and the per-position / per-chunk decays (XLA; [b, h, L] and [b, h, nc])."""
    b, h, nc, q = config.b, config.h, config.nc, config.q
    cs = jnp.cumsum(a.reshape(b, h, nc, q), axis=-1)
    seg_c = seg.reshape(b, 1, nc, q)
    seg_end = seg_c[..., -1]  # [b, 1, nc]
    seg_enter = jnp.concatenate([seg_c[..., :1, 0], seg_end[..., :-1]], axis=-1)  # before chunk c
    cs_end = cs[..., -1]
    w_in = jnp.where(seg_c == seg_enter[..., None], jnp.exp(cs), 0.0)
    dout = jnp.where(seg_c == seg_end[..., None], jnp.exp(jnp.minimum(cs_end[..., None] - cs, 0.0)), 0.0)
    gate = jnp.where(seg_end == seg_enter, jnp.exp(cs_end), 0.0)
    flat = lambda t: t.reshape(b, h, nc * q)  # noqa: E731
    return flat(cs), flat(w_in), flat(dout), flat(dout) * dt, gate


def _states(config, x, dt, a, B, C, s0, seg):
    cs, w_in, dout, w_out, gate = _weights(config, dt, a, seg)
    cb = _launch_cb(config, C, B)
    ent, final = _launch_state_pass(config, _launch_chunk_state(config, x, w_out, B), gate, s0)
    return (cs, w_in, dout, w_out, gate), cb, ent, final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(config, x, dt, a, B, C, D, s0, seg):
    (cs, w_in, *_), cb, ent, final = _states(config, x, dt, a, B, C, s0, seg)
    y = _launch_chunk_scan(config, cb, x, dt, cs, seg, w_in, C,
                           ent.reshape(config.b, config.nc, config.h, config.p, config.n), D)
    return y, final.reshape(s0.shape)


def _core_fwd(config, x, dt, a, B, C, D, s0, seg):
    return _core(config, x, dt, a, B, C, D, s0, seg), (x, dt, a, B, C, D, s0, seg)


def _core_bwd(config, res, cts):
    x, dt, a, B, C, D, s0, seg = res
    dy, dfinal = cts
    dy = dy.astype(x.dtype)
    b, h, nc, q = config.b, config.h, config.nc, config.q
    (cs, w_in, dout, w_out, gate), cb, ent, _ = _states(config, x, dt, a, B, C, s0, seg)

    ds = _launch_chunk_state(config, dy, w_in, C)
    dso, ds0, dgate = _launch_state_pass_bwd(config, ds, gate, ent, dfinal)
    dcb, da = _launch_dcb(config, cb, dy, x, dt, cs, seg)
    dC, dB, f, e = _launch_dbc(config, dcb, B, C, dy, x, ent, dso, w_in, w_out)
    dx, ddt, dd = _launch_dx(config, cb, dy, x, dt, cs, seg, dout, B, dso, D)

    # d cs -> d a within each chunk: cs_i holds a_k for k <= i, so w_in's term (d cs_i = f_i)
    # reaches every a_k, k <= i (reverse cumsum); w_out's term exp(cs_end - cs_j) holds the a_k,
    # j < k (exclusive cumsum of e); the chunk decay exp(cs_end) holds all a_k of its chunk.
    chunked = lambda t: t.sum(axis=2).reshape(b, h, nc, q)  # noqa: E731  (partials over blocks)
    e = chunked(e)
    da = (da.reshape(b, h, nc, q)
          + jnp.cumsum(chunked(f)[..., ::-1], axis=-1)[..., ::-1]
          + jnp.pad(jnp.cumsum(e, axis=-1)[..., :-1], [(0, 0)] * 3 + [(1, 0)])
          + (gate * dgate.sum(axis=2))[..., None])
    return (dx, ddt.sum(axis=2), da.reshape(a.shape), dB.astype(B.dtype), dC.astype(C.dtype),
            dd.sum(axis=(0, 2, 3)), ds0.reshape(s0.shape), None)


_core.defvjp(_core_fwd, _core_bwd)


def _next_pow2(v):
    return 1 << max(v - 1, 0).bit_length()


# jit: eager calls then reuse the compiled kernels (each trace builds new index maps, which
# pallas_call's own cache would not recognise); inside an outer jit this is inlined.
@functools.partial(jax.jit, static_argnames=("chunk_size", "config"))
def ssd_pallas(x, dt, A, B, C, chunk_size, D=None, initial_state=None, seq_idx=None, *,
               config: SsdConfig | None = None):
    """Chunked SSD through the Pallas kernels; the contract of `reference.ssd_chunked`
    (y [b, l, h, p] in x's dtype, final_state fp32 [b, h, p, n]), differentiable in x, dt, A, B,
    C, D and initial_state. chunk_size must be a power of two; p and n are zero-padded to powers
    of two (at least 16 on a GPU). config: tiles and launch options (None: the `SsdConfig`
    defaults). Shapes are checked by `api.ssd`."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise ValueError(f"ssd(implementation='pallas'): chunk_size must be a power of two; got {chunk_size}")
    launch = (config or SsdConfig()).resolved()
    # Triton's dot needs every tile dimension >= 16: on a GPU, small heads / states are zero-padded to 16
    P, N = (max(_next_pow2(v), 1 if launch.interpret else 16) for v in (p, n))
    config = _Cfg(b=b, nc=-(-l // chunk_size), q=chunk_size, h=h, g=g, p=P, n=N, bp=min(launch.block_p, P),
               bn=min(launch.block_n, N), bpn=min(launch.block_pn, P * N), launch=launch)
    if not launch.interpret and min(config.q, config.bp, config.bn, N) < 16:
        raise ValueError(f"ssd(implementation='pallas') on a GPU: chunk_size, the p- and n-tiles and the "
                         f"(padded) state size n must be >= 16 (Triton's dot); got {chunk_size}, "
                         f"{config.bp}, {config.bn}, {N}")
    pad_l = config.length - l
    cdt = jnp.result_type(x.dtype, B.dtype, C.dtype)

    def pad(t, *widths):
        return jnp.pad(t, [(0, 0), (0, pad_l)] + [(0, w) for w in widths])

    xk = pad(x.astype(cdt), 0, P - p)
    Bk, Ck = (pad(t.astype(cdt), 0, N - n) for t in (B, C))
    dtk = pad(dt.astype(f32), 0).transpose(0, 2, 1)  # [b, h, L]; dt = 0 past l keeps the state
    ak = dtk * A.astype(f32)[:, None]
    seg = (jnp.zeros((b, l), jnp.int32) if seq_idx is None else segment_ids(seq_idx))
    seg = jnp.pad(seg, [(0, 0), (0, pad_l)], mode="edge")
    Dk = jnp.zeros((h,), f32) if D is None else D.astype(f32)
    s0 = (jnp.zeros((b, h, P, N), f32) if initial_state is None
          else jnp.pad(initial_state.astype(f32), [(0, 0), (0, 0), (0, P - p), (0, N - n)]))
    y, final = _core(config, xk, dtk, ak, Bk, Ck, Dk, s0, seg)
    return y[:, :l, :, :p].astype(x.dtype), final[:, :, :p, :n]


__all__ = ["SsdConfig", "ssd_pallas"]
