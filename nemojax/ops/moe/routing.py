"""Nemotron 3 router: sigmoid scores, selection-only correction bias, group-limited top-k."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def route(logits, correction_bias, *, top_k: int, n_group: int = 1, topk_group: int = 1,
          norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    """Returns (weights [T, K] fp32, indices [T, K] int32) for router logits [T, E].

    scores = sigmoid(logits). Experts are *selected* on scores + correction_bias, restricted to
    the `topk_group` groups (of `n_group`) whose two best biased scores sum highest; the
    *weights* are the unbiased scores of the selected experts, optionally normalised to sum 1,
    times `routed_scaling_factor`.
    """
    t, e = logits.shape
    if e % n_group or topk_group > n_group or top_k > topk_group * (e // n_group):
        raise ValueError(f"route: need E % n_group == 0, topk_group <= n_group and top_k <= reachable experts; "
                         f"got E={e}, n_group={n_group}, topk_group={topk_group}, top_k={top_k}")
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + correction_bias.astype(jnp.float32)
    if n_group > 1:
        grouped = choice.reshape(t, n_group, e // n_group)
        group_score = jnp.sum(jax.lax.top_k(grouped, min(2, e // n_group))[0], axis=-1)
        kept = jax.lax.top_k(group_score, topk_group)[1]
        group_mask = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], kept].set(True)
        choice = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(t, e)
    indices = jax.lax.top_k(choice, top_k)[1]
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * routed_scaling_factor, indices.astype(jnp.int32)
