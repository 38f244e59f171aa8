"""Autoregressive generation: one prefill that fills SSD/conv states and KV caches, then a compiled
decode loop (`lax.scan`) in which a Mamba layer costs the same at every step."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.nn.ffn import inference_copy
from nemojax.nn.model import HybridLM


def sample_logits(logits, key, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, else softmax sampling with
    optional top-k and nucleus (top-p) truncation. Softmax in fp32."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p: tokens whose preceding mass is < top_p
        n_keep = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature, top_k, top_p, key, vocab_size: int):
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


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(graphdef, state, tokens, key, *, max_new_tokens, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    b, l = tokens.shape
    cache = model.init_cache(b, l + max_new_tokens)
    logits, cache = model.forward(tokens, cache)
    keys = jax.random.split(key, max_new_tokens)
    first = sample_logits(logits[:, -1], keys[0], temperature, top_k, top_p)

    def step(carry, k):
        tok, cache = carry
        logits, cache = model.forward(tok[:, None], cache)
        nxt = sample_logits(logits[:, -1], k, temperature, top_k, top_p)
        return (nxt, cache), nxt

    (_, _), rest = jax.lax.scan(step, (first, cache), keys[1:])
    return jnp.concatenate([tokens, first[:, None], rest.T.reshape(b, -1)], axis=1)


def generate(model: HybridLM, tokens, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, key=None):
    """Continue `tokens` (int [B, L]) by `max_new_tokens`; returns int32 [B, L + max_new_tokens].

    Greedy at `temperature` 0 (where `top_k` / `top_p` are errors: nothing is sampled), else sampling
    from softmax(logits / temperature), restricted to the `top_k` most likely tokens and to the smallest
    set whose probability reaches `top_p` when given."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be [batch, length>0]; got shape {tokens.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p, key, model.cfg.vocab_size)
    graphdef, state = nnx.split(inference_copy(model))
    return _generate(graphdef, state, tokens, jax.random.key(0) if key is None else key,
                     max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k, top_p=top_p)
