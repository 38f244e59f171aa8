"""Load balancing as Nemotron's MoE layers are trained (Megatron defaults): the aux-loss-free
correction-bias update, plus a small per-sequence auxiliary loss; and the router z-loss. All fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def update_correction_bias(bias, load, rate: float):
    """bias + rate * sign(mean(load) - load): under-loaded experts become easier to select.

    Applied after each optimizer step, outside the optimizer (the bias only affects selection, which
    has no gradient)."""
    load = load.astype(jnp.float32)
    return bias + rate * jnp.sign(jnp.mean(load) - load)


def seq_aux_loss(logits_BLE, indices_BLK, top_k: int):
    """Megatron's `seq_aux_loss`, per sequence then averaged over sequences:
        sum_e f_e * P_e,   f_e = E / (K L) * #{(t, k): e chosen},   P_e = mean_t s_te / sum_e' s_te',
    with s = sigmoid(logits). Equals 1 when routing is uniform and grows as it concentrates; its
    gradient reaches the router through P."""
    e = logits_BLE.shape[-1]
    length = logits_BLE.shape[1]
    scores = jax.nn.sigmoid(logits_BLE.astype(jnp.float32))
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    counts = jnp.sum(jax.nn.one_hot(indices_BLK, e, dtype=jnp.float32), axis=(1, 2))  # [B, E]
    f = counts * e / (top_k * length)
    return jnp.mean(jnp.sum(f * jnp.mean(probs, axis=1), axis=-1))


def router_z_loss(logits):
    """mean_t logsumexp(logits_t)^2 (ST-MoE): keeps router logits small."""
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)
