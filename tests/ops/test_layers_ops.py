"""Conv, norms and attention against direct NumPy formulas; every attention implementation
against a NumPy loop and against the reference, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.ops.attention import IMPLEMENTATIONS, attention, default_implementation
from nemojax.ops.conv import causal_conv1d
from nemojax.ops.norms import gated_rms_norm, rms_norm
from testutils import rel_l2


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


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_brute_force_with_gqa_and_empty_slots(window, impl):
    k = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(k[0], (2, 5, 4, 8))
    kk = jax.random.normal(k[1], (2, 9, 2, 8))
    v = jax.random.normal(k[2], (2, 9, 2, 8))
    qp = np.array([[2, 3, 4, 5, 6]] * 2, np.int32)
    kp = np.array([[0, 1, 2, 3, 4, 5, 6, -1, -1]] * 2, np.int32)  # two empty cache slots
    out = attention(q, kk, v, jnp.asarray(qp), jnp.asarray(kp), sliding_window=window, implementation=impl)
    np.testing.assert_allclose(out, brute_attention(q, kk, v, qp, kp, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_query_without_visible_keys_gives_zeros(impl):
    q = jnp.ones((1, 2, 2, 4))
    kv = jnp.ones((1, 3, 1, 4))
    # query 0 sees no key (all slots empty or in its future); query 1 sees slot 0
    out = attention(q, kv, kv, jnp.array([[0, 5]]), jnp.array([[-1, 5, 7]]), implementation=impl)
    np.testing.assert_array_equal(out[:, 0], 0.0)
    np.testing.assert_allclose(out[:, 1], 1.0, rtol=1e-6)


def cache_case(seed=5):
    """A partially filled cache, rows at different fill levels (one chunk of 3 new tokens each):
    row 0 holds positions 0..6 of 12 slots, row 1 positions 0..9; GQA 6 query heads on 2 kv heads."""
    k = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k[0], (2, 3, 6, 16))
    kk = jax.random.normal(k[1], (2, 12, 2, 16))
    v = jax.random.normal(k[2], (2, 12, 2, 16))
    slots = np.arange(12)
    kp = np.stack([np.where(slots < 7, slots, -1), np.where(slots < 10, slots, -1)]).astype(np.int32)
    qp = np.array([[4, 5, 6], [7, 8, 9]], np.int32)
    ct = jax.random.normal(k[3], q.shape)
    return (q, kk, v), qp, kp, ct


@pytest.mark.parametrize("window", [None, 4])
def test_jax_nn_matches_reference_and_numpy_with_a_partial_cache(window):
    """"jax_nn" (jax.nn.dot_product_attention) against the NumPy loop and the "xla" reference,
    forward and gradients in q, k, v; fp32 to 1e-5, and bf16 inputs against fp32 math on the same
    bf16-rounded values."""
    (q, kk, v), qp, kp, ct = cache_case()
    pos = (jnp.asarray(qp), jnp.asarray(kp))

    @jax.jit
    def run(q, kk, v, ct):
        outs = {}
        for impl in IMPLEMENTATIONS:
            def f(*a, impl=impl):
                return attention(*a, *pos, sliding_window=window, implementation=impl)
            y, vjp = jax.vjp(f, q, kk, v)
            outs[impl] = (y, vjp(ct.astype(y.dtype)))
        return outs

    out = run(q, kk, v, ct)
    np.testing.assert_allclose(out["jax_nn"][0], brute_attention(q, kk, v, qp, kp, window), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["jax_nn"][0], out["xla"][0], rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(("dq", "dk", "dv"), out["jax_nn"][1], out["xla"][1], strict=True):
        assert np.abs(np.asarray(g_ref)).max() > 0.1, name  # large against the 1e-5 tolerance
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5, err_msg=name)

    bf = [t.astype(jnp.bfloat16) for t in (q, kk, v)]
    out_bf = run(*bf, ct)
    out_ref = run(*[t.astype(jnp.float32) for t in bf], ct)["xla"]
    np.testing.assert_allclose(brute_attention(*bf, qp, kp, window), out_ref[0], rtol=1e-5, atol=1e-5)
    # bf16 roundings: the probabilities before the value product and the output (2^-9 relative
    # each), and for gradients the bf16 cotangents through the softmax; observed <= 3.5e-3
    for impl in IMPLEMENTATIONS:
        y, grads = out_bf[impl]
        assert y.dtype == jnp.bfloat16 and rel_l2(y, out_ref[0]) < 1e-2, impl
        for name, g, g_ref in zip(("dq", "dk", "dv"), grads, out_ref[1], strict=True):
            assert g.dtype == jnp.bfloat16 and rel_l2(g, g_ref) < 1e-2, (impl, name, rel_l2(g, g_ref))


def test_attention_bad_input_is_named():
    (q, kk, v), qp, kp, _ = cache_case()
    qp, kp = jnp.asarray(qp), jnp.asarray(kp)
    assert IMPLEMENTATIONS == ("xla", "jax_nn") and default_implementation() in IMPLEMENTATIONS
    with pytest.raises(ValueError, match=r"implementation must be None or one of \('xla', 'jax_nn'\); got 'cudnn'"):
        attention(q, kk, v, qp, kp, implementation="cudnn")
    with pytest.raises(ValueError, match="Hq % Hkv == 0"):
        attention(q[:, :, :5], kk, v, qp, kp)
    with pytest.raises(ValueError, match="one dtype"):
        attention(q, kk.astype(jnp.bfloat16), v, qp, kp)
    with pytest.raises(ValueError, match="k_pos must be an integer array"):
        attention(q, kk, v, qp, kp[:, :-1])
    with pytest.raises(ValueError, match="q_pos must be an integer array"):
        attention(q, kk, v, qp.astype(jnp.float32), kp)
    with pytest.raises(ValueError, match="sliding_window must be None or an int >= 1; got 0"):
        attention(q, kk, v, qp, kp, sliding_window=0)
