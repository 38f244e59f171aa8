"""Expert importance for pruning MoE layers: ranked-choice voting over the router's preferences,
and the output error of removing each expert alone. `rank_experts` ranks experts most important
first by either, for `puzzle.library.keep_experts(moe, ranking[:n])`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.nn.ffn import MoE


def router_preferences(moe: MoE, x) -> np.ndarray:
    """Each token's experts in the order the router prefers them (selection score sigmoid(logit) +
    correction bias, highest first): int [T, E] for x [..., D]."""
    x_TD = x.reshape(-1, x.shape[-1])
    choice = jax.nn.sigmoid(moe.router_logits(x_TD)) + moe.correction_bias[...]
    return np.argsort(-np.asarray(choice), axis=1, kind="stable")


def ranked_choice(preferences, top_k: int) -> np.ndarray:
    """Experts ranked by ranked-choice elimination, most important first.

    Each round every token votes for its `top_k` most preferred surviving experts; the expert with the
    fewest votes is eliminated (every surviving expert starts the count at 0, so one that no token
    picks goes first) and struck from every ballot. Ties: the expert with the lower mean position on
    the ballots survives. The last expert left ranks first."""
    prefs = np.asarray(preferences)
    if prefs.ndim != 2 or not np.all(np.sort(prefs, axis=1) == np.arange(prefs.shape[1])):
        raise ValueError("ranked_choice: preferences must be [tokens, experts], each row a permutation of the experts")
    n_experts = prefs.shape[1]
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"ranked_choice: top_k must be in [1, {n_experts}]; got {top_k}")
    mean_position = np.argsort(prefs, axis=1).mean(0)  # position of expert e on each ballot, averaged
    alive = np.ones(n_experts, bool)
    eliminated = []
    while alive.sum() > 1:
        ballots = prefs[alive[prefs]].reshape(prefs.shape[0], -1)  # surviving experts in preference order
        votes = np.bincount(ballots[:, :min(top_k, alive.sum())].ravel(), minlength=n_experts)
        candidates = np.flatnonzero(alive)
        loser = min(candidates, key=lambda e: (votes[e], -mean_position[e], -e))
        alive[loser] = False
        eliminated.append(loser)
    return np.array([int(np.flatnonzero(alive)[0])] + eliminated[::-1])


def removal_error(moe: MoE, x) -> np.ndarray:
    """For each expert e: the mean squared difference of the layer's output when e is removed from
    selection (its tokens re-routed to their next choices), over all tokens of x [..., D] and output
    dims: the displaced tokens' error weighted by the fraction displaced. float [E]."""
    x_TD = x.reshape(-1, x.shape[-1])
    run = nnx.jit(lambda m, x: m(x)[0])
    base = np.asarray(run(moe, x_TD), np.float64)
    probe = nnx.clone(moe)
    out = np.zeros(moe.spec.num_experts)
    for e in range(moe.spec.num_experts):
        bias = moe.correction_bias[...]
        probe.correction_bias[...] = bias.at[e].set(-jnp.inf)
        out[e] = np.mean((np.asarray(run(probe, x_TD), np.float64) - base) ** 2)
    return out


SCORERS = {
    "rcv": lambda moe, x: ranked_choice(router_preferences(moe, x), moe.spec.top_k),
    "rem": lambda moe, x: np.argsort(-removal_error(moe, x), kind="stable"),
}


def rank_experts(moe: MoE, x, scorer: str) -> np.ndarray:
    """The experts of `moe`, most important first on its inputs x [..., D], by `scorer`: "rcv"
    (ranked-choice voting with the layer's own top_k) or "rem" (largest removal error first)."""
    if scorer not in SCORERS:
        raise ValueError(f"rank_experts: scorer must be one of {tuple(SCORERS)}; got {scorer!r}")
    return SCORERS[scorer](moe, x)
