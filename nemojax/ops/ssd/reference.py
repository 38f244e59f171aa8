"""Plain-JAX SSD (Mamba-2 state-space duality): the chunked algorithm, the sequential
recurrence (the oracle), and the single decode step. All state math in fp32.

Per head: s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T ;  y_t = s_t C_t + D x_t.
Head i reads group i // (H / G) of B and C.

Packed rows (seq_idx [b, l] ints): the state resets to zero wherever seq_idx changes between
consecutive positions, so sequences packed into one row never see each other. initial_state is
the state before position 0 (it feeds the row's first sequence only) and the final state is the
state after the last position (the row's last sequence), as in mamba_ssm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def segment_ids(seq_idx):
    """[b, l] ints -> int32 ids starting at 0 that grow by one at each change of seq_idx along a
    row: nondecreasing whatever seq_idx was, so "same sequence" is an equality test."""
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(jnp.int32)
    return jnp.pad(jnp.cumsum(change, axis=1), [(0, 0), (1, 0)])


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, initial_state=None, seq_idx=None):
    """Chunked SSD: intra-chunk masked "attention", chunk states, a recurrence over chunks,
    state -> output. Any length: the tail is padded with dt = 0, which leaves the state as is.
    seq_idx [b, l] (optional): packed sequences, see the module docstring."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    q = min(chunk_size, l)  # a sequence shorter than a chunk (a few tokens to verify) is one chunk, unpadded
    pad = (-l) % q
    nc = (l + pad) // q

    def chunked(t):  # [b, l, ...] -> fp32 [b, c, Q, ...]
        t = jnp.pad(t.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        return t.reshape(b, nc, q, *t.shape[2:])

    # Two layouts of x: head-major [b, c, g, r, Q, p] for the per-head [Q, Q] maps, token-major
    # [b, c, g, Q, r*p] for the chunk states, which are kept n-major [.., n, r*p]. Then every
    # contraction is one batched matmul over leading axes whose operands need at most a
    # transpose of contiguous rows (a state layout [.., r*p, n] makes XLA copy the outputs'
    # gradient to [.., r*p, Q] with a stride-64 gather: 10% of the SSD backward). Each contraction
    # has two operands: with three, XLA may multiply out a [b, c, Q, g, r, p, n] product first.
    xc = chunked(x).reshape(b, nc, q, g, r * p)
    xt = xc.transpose(0, 1, 3, 2, 4)  # [b, c, g, Q, r*p]
    xh = xc.reshape(b, nc, q, g, r, p).transpose(0, 1, 3, 4, 2, 5)  # [b, c, g, r, Q, p]
    dth = chunked(dt).reshape(b, nc, q, g, r).transpose(0, 1, 3, 4, 2)  # [b, c, g, r, Q]
    Bg = chunked(B).transpose(0, 1, 3, 2, 4)  # [b, c, g, Q, n]
    Cg = chunked(C).transpose(0, 1, 3, 2, 4)
    causal = jnp.tril(jnp.ones((q, q), bool))
    if seq_idx is not None:  # masks broadcast against [b, c, g, (r,) Q, ...]; no cost without seq_idx
        seg = jnp.pad(segment_ids(seq_idx), [(0, 0), (0, pad)], mode="edge").reshape(b, nc, q)
        seg_end = seg[:, :, -1]
        seg_enter = jnp.concatenate([seg[:, :1, 0], seg_end[:, :-1]], axis=1)  # before chunk c
        same_intra = causal & (seg[:, :, :, None] == seg[:, :, None, :])  # [b, c, Q, Q]
        same_end = (seg == seg_end[..., None])[:, :, None, :, None]  # [b, c, 1, Q, 1]
        same_enter = (seg == seg_enter[..., None])[:, :, None, :, None]
        no_reset = (seg_end == seg_enter)[:, :, None, None, None]  # [b, c, 1, 1, 1]
    # fp32 cumsum of dt*A within each chunk, as a product with the lower-triangular ones: XLA's
    # cumsum (a reduce-window) is recomputed inside every fusion that reads it, per [Q, Q] element.
    cs = jnp.einsum("bcgrj,ij->bcgri", dth * A.astype(f32).reshape(g, r, 1), causal.astype(f32),
                    precision=jax.lax.Precision.HIGHEST)

    # 1. intra-chunk: y_i += sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j, one [Q, Q] map per head
    # mask before exp: no inf * 0 in gradients
    mask = causal if seq_idx is None else same_intra[:, :, None, None]
    decay = jnp.exp(jnp.where(mask, cs[..., :, None] - cs[..., None, :], -jnp.inf))
    cb = jnp.einsum("bcgin,bcgjn->bcgij", Cg, Bg)  # shared by the heads of a group
    y_diag = jnp.einsum("bcgrij,bcgrjp->bcgrip", cb[:, :, :, None] * decay * dth[..., None, :], xh)

    # 2. state contributed by each chunk, decayed to the chunk's end: [b, c, g, n, r*p]
    to_end = (jnp.exp(cs[..., -1:] - cs) * dth).transpose(0, 1, 2, 4, 3)  # [b, c, g, Q, r]
    if seq_idx is not None:
        to_end = jnp.where(same_end, to_end, 0.0)
    x_to_end = (xt.reshape(b, nc, g, q, r, p) * to_end[..., None]).reshape(b, nc, g, q, r * p)
    chunk_states = jnp.einsum("bcgjn,bcgjk->bcgnk", Bg, x_to_end)

    # 3. recurrence over chunks: the state entering each chunk
    s0 = (jnp.zeros((b, g, n, r * p), f32) if initial_state is None
          else initial_state.astype(f32).reshape(b, g, r * p, n).transpose(0, 1, 3, 2))
    chunk_decay = jnp.exp(jnp.repeat(cs[..., -1], p, axis=-1))[:, :, :, None, :]  # [b, c, g, 1, r*p]
    if seq_idx is not None:
        chunk_decay = jnp.where(no_reset, chunk_decay, 0.0)

    def step(s, inputs):
        decay_c, new = inputs
        return decay_c * s + new, s

    final, entering = jax.lax.scan(step, s0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)  # [b, c, g, n, r*p]

    # 4. entering state -> outputs, then both terms to [b, l, h, p]
    y_off = jnp.einsum("bcgin,bcgnk->bcgik", Cg, entering).reshape(b, nc, g, q, r, p)
    from_enter = jnp.exp(cs).transpose(0, 1, 2, 4, 3)  # [b, c, g, Q, r]
    if seq_idx is not None:
        from_enter = jnp.where(same_enter, from_enter, 0.0)
    y_off = y_off * from_enter[..., None]
    y = y_diag.transpose(0, 1, 4, 2, 3, 5) + y_off.transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(b, nc * q, h, p)[:, :l]
    if D is not None:
        y = y + D.astype(f32)[:, None] * x.astype(f32)
    return y, final.reshape(b, g, n, r, p).transpose(0, 1, 3, 4, 2).reshape(b, h, p, n)


def ssd_step(state, x, dt, A, B, C, D=None):
    """One recurrence step. state [b,h,p,n] fp32; x [b,h,p]; dt [b,h]; B, C [b,g,n]."""
    b, h, p = x.shape
    g = B.shape[1]
    Bh = jnp.repeat(B.astype(f32), h // g, axis=1)
    Ch = jnp.repeat(C.astype(f32), h // g, axis=1)
    dt = dt.astype(f32)
    xf = x.astype(f32)
    state = (jnp.exp(dt * A.astype(f32))[..., None, None] * state.astype(f32)
             + (dt[..., None] * xf)[..., None] * Bh[:, :, None, :])
    y = jnp.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + D.astype(f32)[:, None] * xf
    return y, state


def ssd_sequential(x, dt, A, B, C, D=None, initial_state=None, seq_idx=None):
    """The recurrence as a `lax.scan` over time: the oracle for the chunked path and kernels.
    With seq_idx the state is zeroed before any position whose seq_idx differs from the previous one."""
    b, l, h, p = x.shape
    n = B.shape[3]
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    if seq_idx is None:
        reset = jnp.zeros((b, l), bool)
    else:
        reset = jnp.pad(seq_idx[:, 1:] != seq_idx[:, :-1], [(0, 0), (1, 0)])

    def step(s, inputs):
        xt, dtt, Bt, Ct, rt = inputs
        y, s = ssd_step(jnp.where(rt[:, None, None, None], 0.0, s), xt, dtt, A, Bt, Ct, D)
        return s, y

    final, ys = jax.lax.scan(step, s0, tuple(jnp.moveaxis(t, 1, 0) for t in (x, dt, B, C, reset)))
    return jnp.moveaxis(ys, 0, 1), final
