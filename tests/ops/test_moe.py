"""Router and routed experts against brute-force NumPy versions written token by token."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.ops.moe import moe_ffn, route


def brute_route(logits, bias, top_k, n_group, topk_group, norm, scale):
    logits = np.asarray(logits, np.float64)
    t, e = logits.shape
    per = e // n_group
    weights, indices = [], []
    for row in range(t):
        s = 1 / (1 + np.exp(-logits[row]))
        c = s + np.asarray(bias, np.float64)
        group_score = [sum(sorted(c[g * per:(g + 1) * per])[-2:]) for g in range(n_group)]
        best = max(itertools.combinations(range(n_group), topk_group), key=lambda gs: sum(group_score[g] for g in gs))
        allowed = [j for g in best for j in range(g * per, (g + 1) * per)]
        chosen = sorted(allowed, key=lambda j: -c[j])[:top_k]
        w = s[chosen]
        if norm:
            w = w / w.sum()
        weights.append(w * scale)
        indices.append(chosen)
    return np.array(weights), np.array(indices)


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_route_matches_brute_force(n_group, topk_group):
    logits = jax.random.normal(jax.random.key(0), (32, 16))
    bias = 0.5 * jax.random.normal(jax.random.key(1), (16,))
    w, idx = route(logits, bias, top_k=3, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5)
    w_ref, idx_ref = brute_route(logits, bias, 3, n_group, topk_group, True, 2.5)
    order = np.argsort(np.asarray(idx), axis=1)
    order_ref = np.argsort(idx_ref, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, 1), np.take_along_axis(idx_ref, order_ref, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1), np.take_along_axis(w_ref, order_ref, 1), rtol=1e-5)


def test_bias_selects_but_does_not_weight():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    bias = jnp.array([0.0, 0.0, 0.0, 5.0])  # pulls expert 3 in despite its low score
    w, idx = route(logits, bias, top_k=2, norm_topk_prob=False)
    assert set(np.asarray(idx[0]).tolist()) == {3, 0}
    sig = jax.nn.sigmoid(logits[0])
    np.testing.assert_allclose(np.sort(w[0]), np.sort(sig[jnp.array([0, 3])]), rtol=1e-6)


def loop_experts(x, w, idx, up, down):
    x, w, up, down = (np.asarray(t, np.float64) for t in (x, w, up, down))
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            y[t] += w[t, k] * (np.maximum(x[t] @ up[e], 0) ** 2) @ down[e]
    return y


@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_moe_ffn_matches_token_loop_with_an_empty_expert(impl):
    k = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(k[0], (24, 8))
    up = jax.random.normal(k[1], (6, 8, 5)) / 3
    down = jax.random.normal(k[2], (6, 5, 8)) / 3
    idx = jax.random.randint(k[3], (24, 2), 0, 5)  # expert 5 receives nothing
    w = jax.random.uniform(k[0], (24, 2))
    y = moe_ffn(x, w, idx, up, down, implementation=impl)
    np.testing.assert_allclose(y, loop_experts(x, w, idx, up, down), rtol=1e-4, atol=1e-4)


def test_ragged_gradients_equal_dense_gradients():
    k = jax.random.split(jax.random.key(3), 4)
    args = (jax.random.normal(k[0], (16, 8)), jax.random.uniform(k[1], (16, 2)),
            jax.random.randint(k[2], (16, 2), 0, 4), jax.random.normal(k[3], (4, 8, 6)) / 3,
            jax.random.normal(k[0], (4, 6, 8)) / 3)

    def loss(impl, x, w, up, down):
        return jnp.sum(jnp.sin(moe_ffn(x, w, args[2], up, down, implementation=impl)))

    gd = jax.grad(lambda *a: loss("dense", *a), argnums=(0, 1, 2, 3))(args[0], args[1], args[3], args[4])
    gr = jax.grad(lambda *a: loss("ragged", *a), argnums=(0, 1, 2, 3))(args[0], args[1], args[3], args[4])
    for a, b in zip(gd, gr):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bad_implementation_is_named():
    with pytest.raises(ValueError, match="implementation must be one of"):
        moe_ffn(jnp.ones((2, 4)), jnp.ones((2, 1)), jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 4, 3)),
                jnp.ones((2, 3, 4)), implementation="magic")
