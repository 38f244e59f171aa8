"""Token sampling shared by plain and speculative decoding: greedy, temperature, top-k and nucleus
(top-p) truncation, as a sampler and as the distribution it samples from."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def truncated_logits(logits, temperature: float, top_k: int | None = None, top_p: float | None = None):
    """fp32 logits [..., V] / `temperature` (> 0), -inf outside the `top_k` most likely tokens and outside
    the smallest set whose probability reaches `top_p`: softmax of this is the sampling distribution."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p: tokens whose preceding mass is < top_p
        n_keep = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_logits(logits, key, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """Next token ids [...] from logits [..., V]: greedy at temperature 0, else a draw from
    softmax(`truncated_logits`)."""
    if temperature == 0.0:
        return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, truncated_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


def check_sampling(temperature, top_k, top_p, key, vocab_size: int):
    if not temperature >= 0:  # also refuses nan
        raise ValueError(f"temperature must be >= 0 (0: greedy); got {temperature}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError(f"top_k={top_k} and top_p={top_p} truncate the sampling distribution, but temperature 0 "
                         "is greedy (argmax) and never samples; pass temperature > 0 or leave both None")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be None or in [1, vocab_size={vocab_size}]; got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1]; got {top_p}")
    if temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG `key`")
