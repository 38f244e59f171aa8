"""Router, routed experts (forward and gradients), capacity dropping, expert parallelism and the
load-balancing losses against NumPy versions written token by token, in float64."""

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.ops.moe import (IMPLEMENTATIONS, api, arrival_rank, capacity, default_implementation, moe_ffn,
                             moe_ffn_expert_parallel, route, router_z_loss, seq_aux_loss, update_correction_bias)
from nemojax.ops.moe.dispatch import loop_tile_rows


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


def loop_grads(x, w, idx, up, down, probe, kept=None):
    """Gradients of sum(probe * y) w.r.t. (x, w, up, down), derived by hand token by token."""
    x, w, up, down, probe = (np.asarray(t, np.float64) for t in (x, w, up, down, probe))
    idx = np.asarray(idx)
    dx, dw, dup, ddown = np.zeros_like(x), np.zeros_like(w), np.zeros_like(up), np.zeros_like(down)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            if kept is not None and not kept[t, k]:
                continue
            e = int(idx[t, k])
            r = np.maximum(x[t] @ up[e], 0)
            dw[t, k] = probe[t] @ ((r ** 2) @ down[e])
            ddown[e] += w[t, k] * np.outer(r ** 2, probe[t])
            dpre = w[t, k] * (down[e] @ probe[t]) * 2 * r
            dup[e] += np.outer(x[t], dpre)
            dx[t] += up[e] @ dpre
    return dx, dw, dup, ddown


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


def rel(a, ref):
    """max |a - ref| / max |ref|: the SSD tests' measure (fp32 results are held to 1e-5)."""
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))


@partial(jax.jit, static_argnames=("implementation", "capacity_factor", "return_stats"))
def ffn(*args, **kw):
    return moe_ffn(*args, **kw)


@partial(jax.jit, static_argnames=("implementation", "capacity_factor"))
def probe_grads(x, w, idx, up, down, probe, implementation, capacity_factor=None):
    def loss(x, w, up, down):
        return jnp.sum(probe * moe_ffn(x, w, idx, up, down, implementation=implementation,
                                       capacity_factor=capacity_factor))
    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w, up, down)


def problem(seed, t=24, d=8, e=6, f=5, k=2, skew=True, empty=()):
    """Distinct top-k experts per token; with `skew` low expert ids are popular (so capacity drops),
    and the experts in `empty` receive nothing."""
    ks = jax.random.split(jax.random.key(seed), 5)
    pref = jax.random.uniform(ks[3], (t, e)) * (jnp.arange(1, e + 1) if skew else 1.0)
    pref = pref.at[:, list(empty)].set(jnp.inf)
    idx = jnp.argsort(pref, axis=1)[:, :k].astype(jnp.int32)
    return (jax.random.normal(ks[0], (t, d)), jax.random.uniform(ks[4], (t, k)), idx,
            jax.random.normal(ks[1], (e, d, f)) / 3, jax.random.normal(ks[2], (e, f, d)) / 3)


def test_hand_derived_gradient_matches_central_differences():
    """The gradient oracle itself, against central differences of the float64 NumPy forward."""
    x, w, idx, up, down = (np.asarray(a, np.float64) for a in problem(1, t=6, d=4, e=3, f=3))
    probe = np.random.default_rng(0).standard_normal(x.shape)
    kept = loop_capacity(idx, 3, 3)
    grads = loop_grads(x, w, idx, up, down, probe, kept)
    params = [x, w, up, down]
    rng = np.random.default_rng(1)
    for _ in range(4):
        v = [rng.standard_normal(p.shape) for p in params]

        def loss(s):
            return np.sum(probe * loop_experts(*[p + s * dv for p, dv in zip(params[:2], v[:2])], idx,
                                               *[p + s * dv for p, dv in zip(params[2:], v[2:])], kept))

        fd = (loss(1e-6) - loss(-1e-6)) / 2e-6
        assert abs(fd - sum(np.sum(g * dv) for g, dv in zip(grads, v))) < 1e-7 * max(1.0, abs(fd))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_and_gradients_match_the_token_loop(impl):
    """Dropless, with an expert that receives nothing (its weight gradients are exactly 0)."""
    x, w, idx, up, down = problem(2, empty=(5,))
    probe = jax.random.normal(jax.random.key(20), x.shape)
    assert rel(ffn(x, w, idx, up, down, implementation=impl), loop_experts(x, w, idx, up, down)) < 1e-5
    got = probe_grads(x, w, idx, up, down, probe, impl)
    for name, g, ref in zip(("x", "weights", "w_up", "w_down"), got, loop_grads(x, w, idx, up, down, probe)):
        assert rel(g, ref) < 1e-5, (impl, name, rel(g, ref))
    assert not np.any(got[2][5]) and not np.any(got[3][5])


def test_capacity_formula():
    # moe_ffn's per expert: T*K assignments over E experts, at most T each (a token reaches an expert once)
    assert capacity(64, 8, None, limit=32) == 32  # dropless: any expert may receive every token
    assert capacity(64, 8, 1.0, limit=32) == 8
    assert capacity(64, 8, 1.3, limit=32) == 11  # ceil(10.4)
    assert capacity(64, 8, 0.01, limit=32) == 1
    assert capacity(64, 8, 100.0, limit=32) == 32
    with pytest.raises(ValueError, match="capacity_factor must be > 0 or None"):
        capacity(64, 8, 0.0, limit=32)


def test_arrival_rank_is_order_of_arrival():
    idx = problem(4, t=40)[2]
    slots = np.asarray(jax.jit(arrival_rank, static_argnums=1)(idx, 6))
    idx = np.asarray(idx)
    seen = [0] * 6
    for t in range(40):
        for k in range(2):
            assert slots[t, k] == seen[int(idx[t, k])]
            seen[int(idx[t, k])] += 1


@pytest.mark.parametrize("impl,factor", [("dense", 0.5), ("ragged", 0.5), ("ragged", 1.5), ("batched", 1.0),
                                         ("batched", 1.5), ("pallas", 0.5), ("loop", 0.5), ("loop", 1.5)])
def test_capacity_drops_exactly_the_late_assignments(impl, factor):
    x, w, idx, up, down = problem(5, t=32, e=6, empty=(4,))
    cap = capacity(32 * 2, 6, factor, limit=32)
    kept = loop_capacity(np.asarray(idx), 6, cap)
    assert 0 < (~kept).sum()  # the skewed routing overflows some experts even at 1.5
    y, stats = ffn(x, w, idx, up, down, implementation=impl, capacity_factor=factor, return_stats=True)
    assert rel(y, loop_experts(x, w, idx, up, down, kept)) < 1e-5
    probe = jax.random.normal(jax.random.key(21), x.shape)
    got = probe_grads(x, w, idx, up, down, probe, impl, factor)
    for name, g, ref in zip(("x", "weights", "w_up", "w_down"), got, loop_grads(x, w, idx, up, down, probe, kept)):
        assert rel(g, ref) < 1e-5, (impl, name, rel(g, ref))
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


def first_expert_takes(n, t=32, e=8):
    """Top-2 routing where expert 0 receives exactly n of the t tokens."""
    first = np.where(np.arange(t) < n, 0, 1 + np.arange(t) % (e - 1))
    second = 1 + (first + np.arange(t) % (e - 2)) % (e - 1)  # never 0, never equal to `first`
    idx = jnp.asarray(np.stack([first, second], axis=1), jnp.int32)
    assert np.bincount(np.asarray(idx).ravel())[0] == n
    return idx


@pytest.mark.parametrize("busiest", [10, 11, 16, 17, 32])
def test_dropless_batched_bucket_edges(busiest):
    """T=32, K=2, E=8: the dropless buffer holds 10, 16 or 32 tokens per expert (mean load 8). Expert 0
    takes exactly `busiest` tokens; one too many for the chosen bucket would spill into the next
    expert's rows, so both sides of each edge are checked, forward and gradients, against the loop."""
    x, w, _, up, down = problem(8, t=32, e=8)
    idx = first_expert_takes(busiest)
    assert np.bincount(np.asarray(idx).ravel()).max() == busiest
    probe = jax.random.normal(jax.random.key(22), x.shape)
    assert rel(ffn(x, w, idx, up, down, implementation="batched"), loop_experts(x, w, idx, up, down)) < 1e-5
    for g, ref in zip(probe_grads(x, w, idx, up, down, probe, "batched"), loop_grads(x, w, idx, up, down, probe)):
        assert rel(g, ref) < 1e-5


@pytest.mark.parametrize("count", [8, 9, 16, 17])
def test_loop_tile_edges(count):
    """T=32, K=2, E=8: "loop" pads each expert to tiles of 8 rows (the mean load), so expert 0
    fills its last tile exactly or spills one row into a new one."""
    assert loop_tile_rows(64, 8) == 8
    x, w, _, up, down = problem(9, t=32, e=8)
    idx = first_expert_takes(count)
    probe = jax.random.normal(jax.random.key(23), x.shape)
    assert rel(ffn(x, w, idx, up, down, implementation="loop"), loop_experts(x, w, idx, up, down)) < 1e-5
    for g, ref in zip(probe_grads(x, w, idx, up, down, probe, "loop"), loop_grads(x, w, idx, up, down, probe)):
        assert rel(g, ref) < 1e-5


def test_loop_tile_rows():
    assert [loop_tile_rows(a, 16) for a in (1, 16, 17, 64, 200, 1024, 10 ** 6)] == [8, 8, 8, 8, 16, 64, 64]
    # a decode step: no expert can receive more rows than there are tokens (or than its capacity)
    assert [loop_tile_rows(16, 16, r) for r in (1, 3, 4, 5, 100)] == [1, 4, 4, 8, 8]


@pytest.mark.parametrize("t", [1, 3, 4])
def test_loop_with_fewer_tokens_than_a_tile(t):
    """Decode-sized calls: one tile per expert, padded beyond the rows it received."""
    x, w, idx, up, down = problem(11, t=t, e=8)
    probe = jax.random.normal(jax.random.key(25), x.shape)
    assert rel(ffn(x, w, idx, up, down, implementation="loop"), loop_experts(x, w, idx, up, down)) < 1e-5
    for g, ref in zip(probe_grads(x, w, idx, up, down, probe, "loop"), loop_grads(x, w, idx, up, down, probe)):
        assert rel(g, ref) < 1e-5


def test_loop_in_bfloat16_follows_float32():
    x, w, idx, up, down = problem(10)
    probe = jax.random.normal(jax.random.key(24), x.shape)
    bf = [a.astype(jnp.bfloat16) for a in (x, up, down)]
    y = ffn(bf[0], w, idx, bf[1], bf[2], implementation="loop")
    assert y.dtype == jnp.bfloat16 and rel(y, loop_experts(x, w, idx, up, down)) < 3e-2
    got = probe_grads(bf[0], w, idx, bf[1], bf[2], probe, "loop")
    for g, ref, a in zip(got, loop_grads(x, w, idx, up, down, probe), (bf[0], w, bf[1], bf[2])):
        assert g.dtype == a.dtype and rel(g, ref) < 3e-2


def test_everything_to_one_expert():
    x, w, _, up, down = problem(7, t=12)
    idx = jnp.stack([jnp.zeros(12, jnp.int32), jnp.ones(12, jnp.int32)], axis=1)
    ref = loop_experts(x, w, idx, up, down, loop_capacity(np.asarray(idx), 6, 3))
    for impl in IMPLEMENTATIONS:
        assert rel(ffn(x, w, idx, up, down, implementation=impl), loop_experts(x, w, idx, up, down)) < 1e-5
        assert rel(ffn(x, w, idx, up, down, implementation=impl, capacity_factor=0.75), ref) < 1e-5  # cap 3


def test_default_implementation_is_known():
    assert default_implementation() in IMPLEMENTATIONS
    assert default_implementation("cpu") == "loop" and default_implementation("gpu") == "ragged"


def test_bad_arguments_are_named():
    args = (jnp.ones((2, 4)), jnp.ones((2, 1)), jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 4, 3)), jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"moe_ffn: implementation must be None or one of \('dense', 'ragged'"):
        moe_ffn(*args, implementation="magic")
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        moe_ffn(*args, capacity_factor=0.0)
    with pytest.raises(ValueError, match="w_up"):
        moe_ffn(*args[:3], jnp.ones((2, 5, 3)), args[4])
    with pytest.raises(ValueError, match="weights"):
        moe_ffn(args[0], jnp.ones((2, 2)), *args[2:])


# --------------------------------------------------------------------------- expert parallelism
# One device here (the pytest process has started jax); tests/train/test_sharding.py runs the
# all-to-all on 8 devices.
def expert_mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("expert",))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_expert_parallel_runs_the_implementation_it_is_given(impl, monkeypatch):
    """The local experts after the all-to-all go through the same switch as moe_ffn (issue 12: the
    setting used to be ignored under an expert mesh)."""
    calls = []

    def spy(*a, **kw):
        calls.append(impl)
        return api._BY_NAME[impl](*a, **kw)

    monkeypatch.setitem(api._BY_NAME, "spy", spy)
    x, w, idx, up, down = problem(11, empty=(5,))
    probe = jax.random.normal(jax.random.key(25), x.shape)
    run = partial(moe_ffn_expert_parallel, mesh=expert_mesh(), implementation="spy")
    assert rel(jax.jit(run)(x, w, idx, up, down), loop_experts(x, w, idx, up, down)) < 1e-5
    assert calls == [impl]
    grads = jax.jit(jax.grad(lambda x, w, up, down: jnp.sum(probe * run(x, w, idx, up, down)),
                             argnums=(0, 1, 2, 3)))(x, w, up, down)
    for g, ref in zip(grads, loop_grads(x, w, idx, up, down, probe)):
        assert rel(g, ref) < 1e-5


def test_expert_parallel_rejects_an_unknown_implementation():
    x, w, idx, up, down = problem(12)
    with pytest.raises(ValueError, match=r"moe_ffn_expert_parallel: implementation must be None or one of"):
        moe_ffn_expert_parallel(x, w, idx, up, down, mesh=expert_mesh(), implementation="magic")


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
