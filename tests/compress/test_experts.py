"""Expert importance: ranked-choice voting on a hand-worked ballot and removal error against a NumPy
re-computation of the routed layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.compress import experts
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


def numpy_moe(x, moe, removed=None):
    """The routed experts' output, token by token (no shared expert, no latent projections)."""
    s = moe.spec
    w_gate, bias = np.asarray(moe.gate_weight[...], np.float64), np.asarray(moe.correction_bias[...], np.float64)
    w_up, w_down = np.asarray(moe.up_proj[...], np.float64), np.asarray(moe.down_proj[...], np.float64)
    out = np.zeros_like(x)
    for t, xt in enumerate(x):
        scores = 1 / (1 + np.exp(-(xt @ w_gate)))
        choice = scores + bias
        if removed is not None:
            choice[removed] = -np.inf
        idx = np.argsort(-choice, kind="stable")[:s.top_k]
        w = scores[idx] / scores[idx].sum() * s.routed_scaling_factor
        for k, e in zip(w, idx):
            out[t] += k * (np.maximum(xt @ w_up[e], 0) ** 2) @ w_down[e]
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
