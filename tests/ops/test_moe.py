"""Router, routed experts, capacity dropping and load-balancing losses against brute-force NumPy
versions written token by token."""

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.ops.moe import (IMPLEMENTATIONS, capacity, default_implementation, moe_ffn, route, router_z_loss,
                             seq_aux_loss, slot_in_expert, update_correction_bias)


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


def loop_experts(x, w, idx, up, down, kept=None):
    x, w, up, down = (np.asarray(t, np.float64) for t in (x, w, up, down))
    idx = np.asarray(idx)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            if kept is None or kept[t, k]:
                e = int(idx[t, k])
                y[t] += w[t, k] * (np.maximum(x[t] @ up[e], 0) ** 2) @ down[e]
    return y


def loop_capacity(idx, num_experts, cap):
    """Walk the tokens in order; an expert takes an assignment while it has had fewer than `cap`."""
    seen = [0] * num_experts
    kept = np.zeros(idx.shape, bool)
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            kept[t, k] = seen[e] < cap
            seen[e] += 1
    return kept


@partial(jax.jit, static_argnames=("implementation", "capacity_factor", "return_stats"))
def ffn(*args, **kw):
    return moe_ffn(*args, **kw)


def problem(seed, t=24, d=8, e=6, f=5, k=2, skew=True, empty=()):
    """Distinct top-k experts per token; with `skew` low expert ids are popular (so capacity drops),
    and the experts in `empty` receive nothing."""
    ks = jax.random.split(jax.random.key(seed), 5)
    pref = jax.random.uniform(ks[3], (t, e)) * (jnp.arange(1, e + 1) if skew else 1.0)
    pref = pref.at[:, list(empty)].set(jnp.inf)
    idx = jnp.argsort(pref, axis=1)[:, :k].astype(jnp.int32)
    return (jax.random.normal(ks[0], (t, d)), jax.random.uniform(ks[4], (t, k)), idx,
            jax.random.normal(ks[1], (e, d, f)) / 3, jax.random.normal(ks[2], (e, f, d)) / 3)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_moe_ffn_matches_token_loop_with_an_empty_expert(impl):
    x, w, idx, up, down = problem(2, empty=(5,))
    y = ffn(x, w, idx, up, down, implementation=impl)
    np.testing.assert_allclose(y, loop_experts(x, w, idx, up, down), rtol=1e-4, atol=1e-4)


def test_capacity_formula():
    assert capacity(32, 2, 8, None) == 32  # dropless: any expert may receive every token
    assert capacity(32, 2, 8, 1.0) == 8
    assert capacity(32, 2, 8, 1.3) == 11  # ceil(10.4)
    assert capacity(32, 2, 8, 0.01) == 1
    assert capacity(32, 2, 8, 100.0) == 32


def test_slot_in_expert_is_arrival_order():
    idx = problem(4, t=40)[2]
    slots = np.asarray(jax.jit(slot_in_expert, static_argnums=1)(idx, 6))
    idx = np.asarray(idx)
    seen = [0] * 6
    for t in range(40):
        for k in range(2):
            assert slots[t, k] == seen[int(idx[t, k])]
            seen[int(idx[t, k])] += 1


@pytest.mark.parametrize("impl,factor", [("dense", 0.5), ("ragged", 0.5), ("ragged", 1.5), ("batched", 1.0),
                                         ("batched", 1.5), ("pallas", 0.5)])
def test_capacity_drops_exactly_the_late_assignments(impl, factor):
    x, w, idx, up, down = problem(5, t=32, e=6, empty=(4,))
    cap = capacity(32, 2, 6, factor)
    kept = loop_capacity(np.asarray(idx), 6, cap)
    assert 0 < (~kept).sum()  # the skewed routing overflows some experts even at 1.5
    y, stats = ffn(x, w, idx, up, down, implementation=impl, capacity_factor=factor, return_stats=True)
    np.testing.assert_allclose(y, loop_experts(x, w, idx, up, down, kept), rtol=1e-4, atol=1e-4)
    # per-expert kept count, and which tokens: the first `cap` arrivals in token order
    np.testing.assert_array_equal(np.asarray(slot_in_expert(idx, 6)) < cap, kept)
    for e in range(6):
        assert kept[np.asarray(idx) == e].sum() == min(cap, (np.asarray(idx) == e).sum())
    np.testing.assert_allclose(stats["dropped_fraction"], (~kept).mean(), rtol=1e-6)
    counts = np.bincount(np.asarray(idx).ravel(), minlength=6)
    np.testing.assert_array_equal(stats["counts"], counts)
    np.testing.assert_allclose(stats["load"], counts / idx.size, rtol=1e-6)
    assert stats["load"].dtype == jnp.float32 and stats["load"][4] == 0


def test_dropless_stats_drop_nothing():
    x, w, idx, up, down = problem(6)
    for impl in IMPLEMENTATIONS:
        _, stats = ffn(x, w, idx, up, down, implementation=impl, return_stats=True)
        assert stats["dropped_fraction"] == 0
        np.testing.assert_allclose(jnp.sum(stats["load"]), 1.0, rtol=1e-6)


@pytest.mark.parametrize("factor", [None, 0.75])
def test_implementations_agree_forward_and_gradients(factor):
    x, w, idx, up, down = problem(3, t=16, e=4, f=6, empty=(2,))

    def loss(impl, x, w, up, down):
        return jnp.sum(jnp.sin(moe_ffn(x, w, idx, up, down, implementation=impl, capacity_factor=factor)))

    ref = jax.jit(jax.value_and_grad(partial(loss, "dense"), argnums=(0, 1, 2, 3)))(x, w, up, down)
    for impl in ("ragged", "batched", "pallas"):
        out = jax.jit(jax.value_and_grad(partial(loss, impl), argnums=(0, 1, 2, 3)))(x, w, up, down)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("busiest", [10, 11, 16, 17, 32])
def test_dropless_batched_bucket_edges(busiest):
    """T=32, K=2, E=8: the dropless buffer holds 10, 16 or 32 tokens per expert (mean load 8). Expert 0
    takes exactly `busiest` tokens; one too many for the chosen bucket would spill into the next
    expert's rows, so both sides of each edge are checked, forward and gradients, against the loop."""
    x, w, _, up, down = problem(8, t=32, e=8)
    first = np.where(np.arange(32) < busiest, 0, 1 + np.arange(32) % 7)
    second = 1 + (first + np.arange(32) % 6) % 7  # never 0, never equal to `first`
    idx = jnp.asarray(np.stack([first, second], axis=1), jnp.int32)
    assert np.bincount(np.asarray(idx).ravel()).max() == busiest
    y = ffn(x, w, idx, up, down, implementation="batched")
    np.testing.assert_allclose(y, loop_experts(x, w, idx, up, down), rtol=1e-4, atol=1e-4)
    loss = lambda impl: jax.grad(lambda up: jnp.sum(jnp.sin(moe_ffn(x, w, idx, up, down, implementation=impl))))
    np.testing.assert_allclose(jax.jit(loss("batched"))(up), jax.jit(loss("dense"))(up), rtol=1e-4, atol=1e-5)


def test_everything_to_one_expert():
    x, w, _, up, down = problem(7, t=12)
    idx = jnp.stack([jnp.zeros(12, jnp.int32), jnp.ones(12, jnp.int32)], axis=1)
    ref = loop_experts(x, w, idx, up, down, loop_capacity(np.asarray(idx), 6, 3))
    for impl in IMPLEMENTATIONS:
        np.testing.assert_allclose(ffn(x, w, idx, up, down, implementation=impl), loop_experts(x, w, idx, up, down),
                                   rtol=1e-4, atol=1e-4)
        y = ffn(x, w, idx, up, down, implementation=impl, capacity_factor=0.75)  # cap = ceil(3) = 3
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_default_implementation_is_known():
    assert default_implementation() in IMPLEMENTATIONS
    assert default_implementation("cpu") == "batched" and default_implementation("gpu") == "ragged"


def test_bad_arguments_are_named():
    args = (jnp.ones((2, 4)), jnp.ones((2, 1)), jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 4, 3)), jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="implementation must be one of"):
        moe_ffn(*args, implementation="magic")
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        moe_ffn(*args, capacity_factor=0.0)


# ------------------------------------------------------------------------------------ load balancing
def np_sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def test_seq_aux_loss_matches_megatron_formula():
    logits = jax.random.normal(jax.random.key(8), (3, 10, 6)) * 2
    b, length, e, k = 3, 10, 6, 2
    total = 0.0
    for s in range(b):
        p = np_sigmoid(logits[s])
        p = p / p.sum(-1, keepdims=True)
        f = np.zeros(e)
        for t in range(length):
            for j in np.argsort(-p[t])[:k]:  # top-k of the unbiased normalised scores
                f[j] += e / (k * length)
        total += (f * p.mean(0)).sum()
    np.testing.assert_allclose(jax.jit(seq_aux_loss, static_argnums=1)(logits, k), total / b, rtol=1e-5)
    # uniform routing scores 1
    assert abs(float(seq_aux_loss(jnp.zeros((1, 6, 6)).at[0, jnp.arange(6), jnp.arange(6)].set(1e-3), 1)) - 1) < 1e-3


def test_seq_aux_loss_gradient_pushes_probability_off_busy_experts():
    logits = jax.random.normal(jax.random.key(9), (2, 8, 4)).at[..., 0].add(3.0)  # expert 0 always chosen
    g = jax.jit(jax.grad(seq_aux_loss), static_argnums=1)(logits, 1)
    assert bool(jnp.all(jnp.isfinite(g)))
    assert bool(jnp.all(g[..., 0] > 0))  # descending lowers the busy expert's score


def test_router_z_loss_matches_numpy():
    logits = jax.random.normal(jax.random.key(10), (2, 5, 7)) * 3
    z = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    np.testing.assert_allclose(jax.jit(router_z_loss)(logits), (z ** 2).mean(), rtol=1e-5)
    assert router_z_loss(logits.astype(jnp.bfloat16)).dtype == jnp.float32


def test_correction_bias_update_is_signed_and_fp32():
    bias = jnp.zeros(4, jnp.float32)
    load = jnp.array([0.5, 0.25, 0.25, 0.0])  # mean 0.25
    for scale in (1, 64):  # fractions or counts
        new = update_correction_bias(bias, load * scale, 1e-3)
        assert new.dtype == jnp.float32
        np.testing.assert_allclose(new, [-1e-3, 0, 0, 1e-3], rtol=1e-6)
