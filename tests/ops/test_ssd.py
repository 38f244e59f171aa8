"""SSD against a plain per-time-step recurrence in float64 NumPy (the independent oracle)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.ops import ssd


def recurrence(x, dt, A, B, C, D=None, s0=None, seq_idx=None):
    x, dt, A, B, C = (np.asarray(t, np.float64) for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    s = np.zeros((b, h, p, n)) if s0 is None else np.asarray(s0, np.float64).copy()
    y = np.zeros_like(x)
    for t in range(l):
        if seq_idx is not None and t > 0:  # a new packed sequence starts from a zero state
            s[np.asarray(seq_idx)[:, t] != np.asarray(seq_idx)[:, t - 1]] = 0.0
        for i in range(h):
            gi = i // (h // g)
            s[:, i] = np.exp(dt[:, t, i] * A[i])[:, None, None] * s[:, i] + \
                (dt[:, t, i, None] * x[:, t, i])[:, :, None] * B[:, t, gi, None, :]
            y[:, t, i] = np.einsum("bpn,bn->bp", s[:, i], C[:, t, gi])
            if D is not None:
                y[:, t, i] += D[i] * x[:, t, i]
    return y, s


def inputs(b=2, l=21, h=4, p=3, g=2, n=5, seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(k[0], (b, l, h, p))
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, l, h)) - 1.0)
    A = -jnp.exp(jax.random.normal(k[2], (h,)))
    B = jax.random.normal(k[3], (b, l, g, n))
    C = jax.random.normal(k[4], (b, l, g, n))
    D = jax.random.normal(k[5], (h,))
    s0 = jax.random.normal(k[6], (b, h, 3, n)) if p == 3 else None
    return [t.astype(dtype) for t in (x, dt, A, B, C, D)], s0


def rel(a, b):
    return np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("impl", ["xla", "sequential"])
@pytest.mark.parametrize("l,chunk,g,use_d,use_s0", [
    (21, 8, 2, True, True),    # several chunks and a partial one
    (16, 8, 2, False, False),  # exact multiple
    (5, 8, 1, True, False),    # shorter than a chunk
    (1, 4, 4, True, True),     # one token
])
def test_matches_recurrence(impl, l, chunk, g, use_d, use_s0):
    (x, dt, A, B, C, D), s0 = inputs(l=l, g=g)
    D = D if use_d else None
    s0 = s0 if use_s0 else None
    y, s = ssd.ssd(x, dt, A, B, C, chunk_size=chunk, D=D, initial_state=s0, implementation=impl)
    y_ref, s_ref = recurrence(x, dt, A, B, C, D, s0)
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5


def test_split_sequence_through_final_state_and_steps():
    (x, dt, A, B, C, D), s0 = inputs(l=24)
    y, s = ssd.ssd(x, dt, A, B, C, chunk_size=8, D=D, initial_state=s0)
    y1, s1 = ssd.ssd(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], chunk_size=8, D=D, initial_state=s0)
    ys, state = [], s1
    for t in range(11, 24):
        yt, state = ssd.ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=D)
        ys.append(yt)
    np.testing.assert_allclose(jnp.concatenate([y1, jnp.stack(ys, 1)], 1), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, s, rtol=1e-5, atol=1e-5)


def test_gradients_match_finite_differences_of_recurrence():
    (x, dt, A, B, C, D), s0 = inputs(b=1, l=10, h=2, p=3, g=1, n=3)
    w = jax.random.normal(jax.random.key(9), x.shape)
    ws = jax.random.normal(jax.random.key(10), s0.shape[:1] + (2, 3, 3))
    args = [x, dt, A, B, C, D, s0[:, :2]]

    def loss(impl, *a):
        y, s = ssd.ssd(*a[:5], chunk_size=4, D=a[5], initial_state=a[6], implementation=impl)
        return jnp.sum(y * w) + jnp.sum(s * ws)

    def loss_ref(*a):
        y, s = recurrence(*a[:5], a[5], a[6])
        return np.sum(y * np.asarray(w, np.float64)) + np.sum(s * np.asarray(ws, np.float64))

    # jit: eager grads compile op by op (10 s for the chunked path)
    grads = {impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=tuple(range(7))))(*args)
             for impl in ssd.IMPLEMENTATIONS}
    rng = np.random.default_rng(0)
    eps = 1e-6
    for i, a in enumerate(args):
        a64 = np.asarray(a, np.float64)
        direction = rng.standard_normal(a64.shape)
        plus = [np.asarray(t, np.float64) for t in args]
        minus = [np.asarray(t, np.float64) for t in args]
        plus[i], minus[i] = a64 + eps * direction, a64 - eps * direction
        fd = (loss_ref(*plus) - loss_ref(*minus)) / (2 * eps)
        for impl, g in grads.items():
            analytic = float(np.sum(np.asarray(g[i], np.float64) * direction))
            assert abs(analytic - fd) <= 2e-3 * max(1.0, abs(fd)), (impl, i, analytic, fd)


def test_bf16_inputs_track_fp32():
    (x, dt, A, B, C, D), s0 = inputs(l=40)
    y_ref, _ = recurrence(x, dt, A, B, C, D, s0)
    bf = [t.astype(jnp.bfloat16) for t in (x, B, C)]
    y, s = ssd.ssd(bf[0], dt, A, bf[1], bf[2], chunk_size=16, D=D, initial_state=s0)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel(y, y_ref) < 2e-2
    g32 = jax.grad(lambda x: jnp.sum(ssd.ssd(x, dt, A, B, C, 16, D, s0)[0] ** 2))(x)
    g16 = jax.grad(lambda x: jnp.sum(ssd.ssd(x, dt, A, bf[1], bf[2], 16, D, s0)[0].astype(jnp.float32) ** 2))(bf[0])
    assert rel(g16, np.asarray(g32, np.float64)) < 2e-2


def test_no_nan_gradients_with_extreme_decay():
    (x, dt, A, B, C, D), _ = inputs(l=16)
    g = jax.grad(lambda dt: jnp.sum(ssd.ssd(x, dt * 200.0, A, B, C, chunk_size=8)[0]))(dt)
    assert np.all(np.isfinite(g))


# Packed rows of l = 21 with chunk 8: boundaries mid-chunk, on a chunk edge (8, 16), a
# length-1 sequence, a row that ends on a length-1 sequence, and ids that go down (any change resets).
SEQ_IDX = np.array([[0] * 3 + [1] * 5 + [2] + [3] * 12,
                    [5] * 16 + [4] * 4 + [6]])


@pytest.mark.parametrize("impl", ["xla", "sequential"])
def test_packed_sequences_match_recurrence_with_resets(impl):
    (x, dt, A, B, C, D), s0 = inputs(l=21)
    y, s = ssd.ssd(x, dt, A, B, C, chunk_size=8, D=D, initial_state=s0, implementation=impl,
                   seq_idx=jnp.asarray(SEQ_IDX))
    y_ref, s_ref = recurrence(x, dt, A, B, C, D, s0, SEQ_IDX)
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5


def test_packed_row_equals_separate_runs():
    """The oracle's packing semantics: each sequence runs alone (the first from initial_state, the
    others from zero), and the final state is the last sequence's."""
    (x, dt, A, B, C, D), s0 = inputs(l=21)
    y, s = ssd.ssd(x, dt, A, B, C, chunk_size=8, D=D, initial_state=s0, seq_idx=jnp.asarray(SEQ_IDX))
    for row in range(2):
        starts = [0] + [t for t in range(1, 21) if SEQ_IDX[row, t] != SEQ_IDX[row, t - 1]] + [21]
        for k, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
            sl = slice(row, row + 1)
            y_k, s_k = recurrence(x[sl, lo:hi], dt[sl, lo:hi], A, B[sl, lo:hi], C[sl, lo:hi], D,
                                  s0[sl] if k == 0 else None)
            assert rel(y[sl, lo:hi], y_k) < 1e-5
        assert rel(s[sl], s_k) < 1e-5


def test_packed_gradients_of_chunked_match_sequential():
    (x, dt, A, B, C, D), s0 = inputs(l=21)
    w = jax.random.normal(jax.random.key(3), x.shape)
    seq = jnp.asarray(SEQ_IDX)

    def loss(impl, *a):
        y, s = ssd.ssd(*a[:5], chunk_size=8, D=a[5], initial_state=a[6], implementation=impl, seq_idx=seq)
        return jnp.sum(y * w) + jnp.sum(s ** 2)

    args = (x, dt, A, B, C, D, s0)
    g_xla, g_seq = (jax.jit(jax.grad(functools.partial(loss, impl), argnums=tuple(range(7))))(*args)
                    for impl in ("xla", "sequential"))
    for a, b in zip(g_xla, g_seq):
        assert rel(a, np.asarray(b, np.float64)) < 1e-5


@pytest.mark.parametrize("change,needle", [
    (dict(dt=jnp.ones((2, 20, 4))), "dt must be"),
    (dict(seq_idx=jnp.zeros((2, 20), jnp.int32)), "seq_idx must be"),
    (dict(seq_idx=jnp.zeros((2, 21))), "seq_idx must be"),
    (dict(B=jnp.ones((2, 21, 3, 5))), "h % g == 0"),
    (dict(implementation="cuda"), "implementation must be"),
])
def test_bad_input_is_named(change, needle):
    (x, dt, A, B, C, D), _ = inputs()
    kw = dict(x=x, dt=dt, A=A, B=B, C=C) | change
    with pytest.raises(ValueError, match=needle):
        ssd.ssd(**kw)
