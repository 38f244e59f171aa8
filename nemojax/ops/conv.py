"""Causal depthwise conv1d with a rolling state (the Mamba-2 short convolution)."""

from __future__ import annotations

import jax.numpy as jnp


def causal_conv1d(x, weight, bias=None, state=None):
    """Depthwise causal convolution over time.

    x [B, L, C]; weight [K, C] (tap k multiplies the input at t - (K-1) + k); bias [C];
    state [B, K-1, C]: the K-1 inputs before x[:, 0] (zeros when None). Returns (y [B, L, C],
    new_state = the last K-1 inputs), so calling it chunk by chunk, or one token at a time,
    equals one call on the whole sequence. Accumulates in fp32.
    """
    k, c = weight.shape
    b, l, cx = x.shape
    if cx != c:
        raise ValueError(f"causal_conv1d: x has {cx} channels but weight is [K={k}, C={c}]")
    if state is None:
        state = jnp.zeros((b, k - 1, c), x.dtype)
    elif state.shape != (b, k - 1, c):
        raise ValueError(f"causal_conv1d: state must be [B, K-1, C] = {(b, k - 1, c)}; got {state.shape}")
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    w = weight.astype(jnp.float32)
    y = sum(xp[:, i:i + l].astype(jnp.float32) * w[i] for i in range(k))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), xp[:, l:]
