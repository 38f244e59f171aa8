"""Plain-JAX SSD (Mamba-2 state-space duality): the chunked algorithm, the sequential
recurrence (the oracle), and the single decode step. All state math in fp32.

Per head: s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T ;  y_t = s_t C_t + D x_t.
Head i reads group i // (H / G) of B and C.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """Chunked SSD: intra-chunk masked "attention", chunk states, a recurrence over chunks,
    state -> output. Any length: the tail is padded with dt = 0, which leaves the state as is."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    q = chunk_size
    pad = (-l) % q
    nc = (l + pad) // q

    def chunked(t):  # [b, l, ...] -> fp32 [b, c, Q, ...]
        t = jnp.pad(t.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        return t.reshape(b, nc, q, *t.shape[2:])

    # Head-major layouts ([b, c, g, r, Q, ...]) make every contraction below one batched matmul
    # over leading axes. Each contraction has two operands: with three, XLA may multiply out a
    # [b, c, Q, g, r, p, n]-sized intermediate first.
    xh = chunked(x).reshape(b, nc, q, g, r, p).transpose(0, 1, 3, 4, 2, 5)  # [b, c, g, r, Q, p]
    dth = chunked(dt).reshape(b, nc, q, g, r).transpose(0, 1, 3, 4, 2)  # [b, c, g, r, Q]
    Bg = chunked(B).transpose(0, 1, 3, 2, 4)  # [b, c, g, Q, n]
    Cg = chunked(C).transpose(0, 1, 3, 2, 4)
    causal = jnp.tril(jnp.ones((q, q), bool))
    # fp32 cumsum of dt*A within each chunk, as a product with the lower-triangular ones: XLA's
    # cumsum (a reduce-window) is recomputed inside every fusion that reads it, per [Q, Q] element.
    cs = jnp.einsum("bcgrj,ij->bcgri", dth * A.astype(f32).reshape(g, r, 1), causal.astype(f32),
                    precision=jax.lax.Precision.HIGHEST)

    # 1. intra-chunk: y_i += sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j, one [Q, Q] map per head
    # mask before exp: no inf * 0 in gradients
    decay = jnp.exp(jnp.where(causal, cs[..., :, None] - cs[..., None, :], -jnp.inf))
    cb = jnp.einsum("bcgin,bcgjn->bcgij", Cg, Bg)  # shared by the heads of a group
    y = jnp.einsum("bcgrij,bcgrjp->bcgrip", cb[:, :, :, None] * decay * dth[..., None, :], xh)

    # 2. state contributed by each chunk, decayed to the chunk's end
    to_end = jnp.exp(cs[..., -1:] - cs) * dth
    chunk_states = jnp.einsum("bcgjn,bcgrjp->bcgrpn", Bg, xh * to_end[..., None])

    # 3. recurrence over chunks: the state entering each chunk
    s0 = (jnp.zeros((b, g, r, p, n), f32) if initial_state is None
          else initial_state.astype(f32).reshape(b, g, r, p, n))

    def step(s, inputs):
        chunk_decay, new = inputs
        return jnp.exp(chunk_decay)[..., None, None] * s + new, s

    final, entering = jax.lax.scan(step, s0, (jnp.moveaxis(cs[..., -1], 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)  # [b, c, g, r, p, n]

    # 4. entering state -> outputs
    y = y + jnp.einsum("bcgin,bcgrpn->bcgrip", Cg, entering) * jnp.exp(cs)[..., None]
    y = y.transpose(0, 1, 4, 2, 3, 5).reshape(b, nc * q, h, p)[:, :l]
    if D is not None:
        y = y + D.astype(f32)[:, None] * x.astype(f32)
    return y, final.reshape(b, h, p, n)


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


def ssd_sequential(x, dt, A, B, C, D=None, initial_state=None):
    """The recurrence as a `lax.scan` over time: the oracle for the chunked path and kernels."""
    b, l, h, p = x.shape
    n = B.shape[3]
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)

    def step(s, inputs):
        xt, dtt, Bt, Ct = inputs
        y, s = ssd_step(s, xt, dtt, A, Bt, Ct, D)
        return s, y

    final, ys = jax.lax.scan(step, s0, tuple(jnp.moveaxis(t, 1, 0) for t in (x, dt, B, C)))
    return jnp.moveaxis(ys, 0, 1), final
