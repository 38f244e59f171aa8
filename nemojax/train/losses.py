"""Training and distillation losses. Every reduction is in fp32 and counts only scored positions.

Targets use `IGNORE` (-100, the HF convention) for positions that do not count; `mask` arguments
are 0/1 weights broadcastable to the token positions [B, L].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from nemojax.data.base import IGNORE


def _masked_mean(values, mask):
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(logits, targets):
    """Mean next-token cross entropy over positions with targets != IGNORE; logits [..., V], targets [...].

    Returns (loss, number of scored positions)."""
    mask = targets != IGNORE
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                jnp.where(mask, targets, 0))
    return _masked_mean(per_token, mask), jnp.sum(mask)


def mtp_targets(targets, depth: int):
    """Targets of MTP depth k (1-based): the next-token targets shifted left by k, IGNORE past the end.

    With targets[t] = token t + 1, depth k at position t predicts token t + k + 1 = targets[t + k]."""
    return jnp.pad(targets[:, depth:], ((0, 0), (0, depth)), constant_values=IGNORE)


def mtp_loss(mtp_logits, targets, lam: float):
    """Multi-token-prediction loss: (lam / D) * sum_k CE(depth-k logits, targets shifted by k), D = len(mtp_logits)."""
    if not mtp_logits:
        return jnp.zeros((), jnp.float32)
    losses = [cross_entropy(lg, mtp_targets(targets, k))[0] for k, lg in enumerate(mtp_logits, start=1)]
    return lam / len(mtp_logits) * sum(losses)


def kd_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per position, averaged over `mask`.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = optax.losses.kl_divergence_with_log_targets(s, t)
    return temperature ** 2 * _masked_mean(kl, jnp.ones(kl.shape) if mask is None else mask)


def cosine_distance(h_student, h_teacher, mask=None, eps: float = 1e-8):
    """Mean of 1 - cos(h_s, h_t) over positions; hidden states [..., D]."""
    dist = optax.losses.cosine_distance(h_student.astype(jnp.float32), h_teacher.astype(jnp.float32), epsilon=eps)
    return _masked_mean(dist, jnp.ones(dist.shape) if mask is None else mask)


def normalized_mse(h_student, h_teacher, mask=None, eps: float = 1e-8):
    """sum ||h_s - h_t||^2 / sum ||h_t||^2 over the scored positions: MSE relative to predicting zero,
    the blockwise-distillation loss of Puzzle (scale-free across layers)."""
    hs, ht = h_student.astype(jnp.float32), h_teacher.astype(jnp.float32)
    m = jnp.ones(hs.shape[:-1]) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(jnp.sum((hs - ht) ** 2, -1) * m) / jnp.maximum(jnp.sum(jnp.sum(ht ** 2, -1) * m), eps)
