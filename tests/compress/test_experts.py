"""Expert importance: ranked-choice voting on a hand-worked ballot and removal error against a NumPy
re-computation of the routed layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.compress import experts
from nemojax.compress.puzzle import library
from nemojax.config import MoESpec
from nemojax.nn.ffn import MoE

BALLOTS = np.array([[0, 1, 2, 3],
                    [0, 2, 1, 3],
                    [1, 0, 2, 3],
                    [2, 1, 0, 3],
                    [1, 2, 0, 3]])


def test_ranked_choice_on_a_hand_worked_ballot():
    # round 1 (first choices): 0 -> 2, 1 -> 2, 2 -> 1, 3 -> 0 votes: expert 3, whom nobody picks, goes first
    # round 2: the same counts: 2 goes; round 3: token 3's vote passes to 1 (0 -> 2, 1 -> 3): 0 goes
    np.testing.assert_array_equal(experts.ranked_choice(BALLOTS, top_k=1), [1, 0, 2, 3])
    # top-2: round 1 counts 0 -> 3, 1 -> 4, 2 -> 3, 3 -> 0: 3 goes; round 2 the same: 0 and 2 tie, and the
    # mean ballot position (0: 1.0, 1: 0.8, 2: 1.2) sends 2; round 3 every token votes for both: 0 goes
    np.testing.assert_array_equal(experts.ranked_choice(BALLOTS, top_k=2), [1, 0, 2, 3])
    with pytest.raises(ValueError, match="permutation"):
        experts.ranked_choice(np.array([[0, 0, 1, 2]]), top_k=1)


def numpy_moe(x, moe, removed=None, top_k=None):
    """The layer's output token by token (no latent projections), routing to `top_k` experts (default:
    the layer's own)."""
    s = moe.spec
    top_k = s.top_k if top_k is None else top_k
    w_gate, bias = np.asarray(moe.gate_weight[...], np.float64), np.asarray(moe.correction_bias[...], np.float64)
    w_up, w_down = np.asarray(moe.up_proj[...], np.float64), np.asarray(moe.down_proj[...], np.float64)
    out = np.zeros_like(x)
    for t, xt in enumerate(x):
        scores = 1 / (1 + np.exp(-(xt @ w_gate)))
        choice = scores + bias
        if removed is not None:
            choice[removed] = -np.inf
        idx = np.argsort(-choice, kind="stable")[:top_k]
        w = scores[idx] / scores[idx].sum() * s.routed_scaling_factor
        for k, e in zip(w, idx):
            out[t] += k * (np.maximum(xt @ w_up[e], 0) ** 2) @ w_down[e]
    if moe.shared_experts is not None:
        up, down = moe.shared_experts.up_proj.kernel[...], moe.shared_experts.down_proj.kernel[...]
        out += np.maximum(x @ np.asarray(up, np.float64), 0) ** 2 @ np.asarray(down, np.float64)
    return out


def test_removal_error_and_preferences_match_numpy():
    spec = MoESpec(num_experts=6, top_k=2, intermediate_size=16, routed_scaling_factor=1.5)
    moe = MoE(spec, 24, std=0.3, out_std=0.3, dtype=jnp.float32, rngs=nnx.Rngs(4))
    moe.correction_bias[...] = jnp.linspace(-0.2, 0.2, 6)
    x = np.asarray(jax.random.normal(jax.random.key(1), (40, 24)), np.float64)
    choice = 1 / (1 + np.exp(-(x @ np.asarray(moe.gate_weight[...], np.float64)))) + np.linspace(-0.2, 0.2, 6)
    prefs = experts.router_preferences(moe, jnp.asarray(x, jnp.float32))
    np.testing.assert_array_equal(prefs[:, :2], np.argsort(-choice, axis=1, kind="stable")[:, :2])
    base = numpy_moe(x, moe)
    want = np.array([np.mean((numpy_moe(x, moe, removed=e) - base) ** 2) for e in range(6)])
    got = experts.removal_error(moe, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-9)
    assert np.all(want > 0)


def test_smaller_top_k_and_narrower_shared_expert_match_numpy():
    spec = MoESpec(num_experts=8, top_k=3, intermediate_size=16, shared_intermediate_size=20,
                   routed_scaling_factor=1.5)
    moe = MoE(spec, 24, std=0.3, out_std=0.3, dtype=jnp.float32, rngs=nnx.Rngs(5))
    moe.correction_bias[...] = jnp.linspace(0.1, -0.1, 8)
    x = np.asarray(jax.random.normal(jax.random.key(2), (40, 24)), np.float64)
    run = nnx.jit(lambda m, x: m(x)[0])
    x32 = jnp.asarray(x, jnp.float32)
    for child in (library.moe_top_k(moe, 3)[1], library.prune_shared_expert(moe, np.arange(20))[1]):
        np.testing.assert_array_equal(run(child, x32), run(moe, x32))
    np.testing.assert_allclose(run(moe, x32), numpy_moe(x, moe), rtol=1e-4, atol=1e-5)
    top1_spec, top1 = library.moe_top_k(moe, 1)
    assert top1_spec == MoESpec(8, 1, 16, 20, routed_scaling_factor=1.5) and moe.spec.top_k == 3
    np.testing.assert_allclose(run(top1, x32), numpy_moe(x, moe, top_k=1), rtol=1e-4, atol=1e-5)
    assert np.max(np.abs(numpy_moe(x, moe, top_k=1) - numpy_moe(x, moe))) > 1e-2
    keep = np.array([17, 2, 9, 5])
    narrow_spec, narrow = library.prune_shared_expert(moe, keep)
    assert narrow_spec.shared_intermediate_size == 4
    w_up, w_down = (np.asarray(m.kernel[...], np.float64) for m in (moe.shared_experts.up_proj,
                                                                     moe.shared_experts.down_proj))
    dropped = np.setdiff1d(np.arange(20), keep)
    without = numpy_moe(x, moe) - np.maximum(x @ w_up[:, dropped], 0) ** 2 @ w_down[dropped]
    np.testing.assert_allclose(run(narrow, x32), without, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="top_k=9 exceeds"):
        library.moe_top_k(moe, 9)
