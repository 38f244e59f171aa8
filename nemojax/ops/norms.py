"""RMSNorm and the gated group RMSNorm of the Mamba-2 mixer; statistics in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, weight, eps: float):
    """weight * x / rms(x), computed in fp32 (weight multiplied in fp32), returned in x's dtype."""
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * h).astype(x.dtype)


def gated_rms_norm(x, gate, weight, group_size: int, eps: float):
    """weight * groupRMSNorm(x * silu(gate)): normalise each contiguous group of `group_size`
    channels; the product and statistics in fp32, cast to x's dtype before the weight (as the
    reference does, `norm_before_gate=False`)."""
    if x.shape[-1] % group_size:
        raise ValueError(f"gated_rms_norm: last dim {x.shape[-1]} is not a multiple of group_size={group_size}")
    h = x.astype(jnp.float32)
    if gate is not None:
        h = h * jax.nn.silu(gate.astype(jnp.float32))
    g = h.reshape(*h.shape[:-1], -1, group_size)
    g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
    return weight * g.reshape(h.shape).astype(x.dtype)
