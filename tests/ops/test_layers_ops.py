"""Conv, norms and attention against direct NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.ops.attention import attention
from nemojax.ops.conv import causal_conv1d
from nemojax.ops.norms import gated_rms_norm, rms_norm


def test_causal_conv_direct_sum_and_streaming():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 11, 5))
    w = jax.random.normal(k[1], (4, 5))
    b = jax.random.normal(k[2], (5,))
    y, state = causal_conv1d(x, w, b)
    xn, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ref = np.zeros_like(xn) + np.asarray(b)
    for t in range(11):
        for i in range(4):
            s = t - 3 + i
            if s >= 0:
                ref[:, t] += xn[:, s] * wn[i]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(state, x[:, -3:])
    y1, s1 = causal_conv1d(x[:, :6], w, b)
    parts = [y1]
    for t in range(6, 11):
        yt, s1 = causal_conv1d(x[:, t:t + 1], w, b, s1)
        parts.append(yt)
    np.testing.assert_allclose(jnp.concatenate(parts, 1), y, rtol=1e-6, atol=1e-6)


def test_norms_match_formulas():
    x = jax.random.normal(jax.random.key(1), (3, 8)) * 3
    z = jax.random.normal(jax.random.key(2), (3, 8))
    w = jax.random.normal(jax.random.key(3), (8,))
    xn = np.asarray(x, np.float64)
    ref = np.asarray(w) * xn / np.sqrt(np.mean(xn ** 2, -1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(rms_norm(x, w, 1e-5), ref, rtol=1e-5)
    h = xn * np.asarray(z) / (1 + np.exp(-np.asarray(z)))
    hg = h.reshape(3, 2, 4)
    ref = np.asarray(w) * (hg / np.sqrt(np.mean(hg ** 2, -1, keepdims=True) + 1e-5)).reshape(3, 8)
    np.testing.assert_allclose(gated_rms_norm(x, z, w, 4, 1e-5), ref, rtol=1e-5, atol=1e-6)
    bf = rms_norm(x.astype(jnp.bfloat16), w, 1e-5)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf, np.float32), rms_norm(x, w, 1e-5), rtol=2e-2, atol=2e-2)


def brute_attention(q, k, v, qp, kp, window):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, l, hq, d = q.shape
    rep = hq // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(l):
            for h in range(hq):
                vis = [j for j in range(k.shape[1]) if 0 <= kp[bi, j] <= qp[bi, i]
                       and (window is None or qp[bi, i] - kp[bi, j] < window)]
                if not vis:
                    continue
                s = np.array([q[bi, i, h] @ k[bi, j, h // rep] / np.sqrt(d) for j in vis])
                p = np.exp(s - s.max())
                out[bi, i, h] = (p / p.sum()) @ v[bi, vis, h // rep]
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_brute_force_with_gqa_and_empty_slots(window):
    k = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(k[0], (2, 5, 4, 8))
    kk = jax.random.normal(k[1], (2, 9, 2, 8))
    v = jax.random.normal(k[2], (2, 9, 2, 8))
    qp = np.array([[2, 3, 4, 5, 6]] * 2, np.int32)
    kp = np.array([[0, 1, 2, 3, 4, 5, 6, -1, -1]] * 2, np.int32)  # two empty cache slots
    out = attention(q, kk, v, jnp.asarray(qp), jnp.asarray(kp), sliding_window=window)
    np.testing.assert_allclose(out, brute_attention(q, kk, v, qp, kp, window), rtol=1e-5, atol=1e-5)


def test_query_without_visible_keys_gives_zeros():
    q = jnp.ones((1, 1, 2, 4))
    kv = jnp.ones((1, 3, 1, 4))
    out = attention(q, kv, kv, jnp.array([[0]]), jnp.array([[-1, -1, -1]]))
    np.testing.assert_array_equal(out, 0.0)
