"""Load balancing as Nemotron's MoE layers are trained (Megatron defaults for Nemotron-H / Nano:
sigmoid router, aux-loss-free expert bias at rate 1e-3, plus `seq_aux_loss` at coefficient 1e-4),
and the ST-MoE router z-loss. All in fp32; the coefficients are the trainer's business."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def update_correction_bias(bias, tokens_per_expert, rate: float):
    """bias + rate * sign(mean(n) - n_e) for assignment counts n [E]: under-loaded experts become easier
    to select. Integer counts (as Megatron uses) make "exactly at the mean" exact, so such an expert
    stays put; fractions would pick up fp32 rounding.

    Applied after each optimizer step, outside the optimizer (the bias only affects selection, which
    has no gradient)."""
    n = tokens_per_expert.astype(jnp.float32)
    return bias + rate * jnp.sign(jnp.mean(n) - n)


def seq_aux_loss(logits_BLE, top_k: int):
    """Megatron-Core's `seq_aux_loss` for a sigmoid router, without its coefficient:

        mean_b sum_e f_be * P_be,   f_be = E / (K L) * #{t in sequence b : e in topk_t},
                                    P_be = mean_t p_te,   p_te = s_te / (sum_e' s_te' + 1e-20),

    s = sigmoid(logits) [B, L, E]. As in Megatron (`compute_routing_scores_for_aux_loss`), topk_t is
    the top-K of the unbiased scores over all experts, not the routed selection (which adds the
    correction bias and the group limit). f carries no gradient (it is a count); the gradient reaches
    the router through P. Uniform routing gives 1.
    """
    b, length, e = logits_BLE.shape
    scores = jax.nn.sigmoid(logits_BLE.astype(jnp.float32))
    probs = scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20)
    top = jax.lax.top_k(probs, top_k)[1]
    counts = jnp.sum(jax.nn.one_hot(top, e, dtype=jnp.float32), axis=(1, 2))  # [B, E]
    f = counts * e / (top_k * length)
    return jnp.mean(jnp.sum(f * jnp.mean(probs, axis=1), axis=-1))


def router_z_loss(logits):
    """mean over tokens of logsumexp(logits_t)^2 (ST-MoE; Megatron's `z_loss_func`): keeps router
    logits small. logits [..., E]."""
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)
