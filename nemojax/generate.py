"""Autoregressive generation: one prefill that fills SSD/conv states and KV caches, then a compiled
decode loop (`lax.scan`) in which a Mamba layer costs the same at every step; or speculative decoding
with the model's MTP layers as the drafter (`nemojax.speculative`)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.nn.attention import check_kv_cache_dtype
from nemojax.nn.ffn import inference_copy
from nemojax.nn.model import HybridLM
from nemojax.sampling import check_sampling, sample_logits
from nemojax.speculative import speculative_generate


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "kv_cache_dtype"))
def _generate(graphdef, state, tokens, key, *, max_new_tokens, temperature, top_k, top_p, kv_cache_dtype):
    model = nnx.merge(graphdef, state)
    b, l = tokens.shape
    cache = model.init_cache(b, l + max_new_tokens, kv_cache_dtype=kv_cache_dtype)
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
             top_k: int | None = None, top_p: float | None = None, key=None, *, draft: str | None = None,
             num_draft: int | None = None, return_stats: bool = False, kv_cache_dtype: str | None = None):
    """Continue `tokens` (int [B, L]) by `max_new_tokens`; returns int32 [B, L + max_new_tokens].

    Greedy at `temperature` 0 (where `top_k` / `top_p` are errors: nothing is sampled), else sampling
    from softmax(logits / temperature), restricted to the `top_k` most likely tokens and to the smallest
    set whose probability reaches `top_p` when given.

    `draft="mtp"`: speculative decoding, the model's MTP layers drafting `num_draft` tokens per step
    (default: the model's `mtp_depth`) that one cached forward verifies (`nemojax.speculative`). Greedy
    output is plain greedy's; sampled output has plain sampling's distribution. With `return_stats`,
    returns (tokens, stats): "steps" (verification forwards), "accepted_per_step" (int array [steps]:
    drafts kept at each step, the minimum over the batch's rows; the last step's may run past
    `max_new_tokens`), "acceptance_rate" (kept drafts / (steps * num_draft)) and "num_draft".
    A prompt shorter than `num_draft` - 1 tokens is first extended to that length by plain decoding (the
    deepest drafting depth starts at token `num_draft` - 1); those tokens are not in the stats.

    `kv_cache_dtype`: how the attention layers cache K and V: None (the model's dtype), "float32" /
    "bfloat16" / "float16", "fp8" (E4M3 codes with the model's calibrated per-layer scales, see
    `nemojax.quant.kv_cache`) or "fp8_uncalibrated" (E4M3 with scales of 1). Attention reads the cache
    back in the compute dtype, so prompt and generated tokens alike see K and V as stored."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be [batch, length>0]; got shape {tokens.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p, key, model.cfg.vocab_size)
    if draft not in (None, "mtp"):
        raise ValueError(f"draft must be None (plain decoding) or 'mtp' (the model's MTP layers); got {draft!r}")
    if draft is None and (num_draft is not None or return_stats):
        raise ValueError(f"num_draft={num_draft} and return_stats={return_stats} are for speculative decoding; "
                         "pass draft='mtp' or leave them unset")
    if draft == "mtp" and model.cfg.mtp_depth == 0:
        raise ValueError("draft='mtp' needs MTP layers, but this model has config.mtp_depth == 0")
    if num_draft is not None and not (isinstance(num_draft, int) and num_draft >= 1):
        raise ValueError(f"num_draft must be an int >= 1; got {num_draft!r}")
    check_kv_cache_dtype(model, kv_cache_dtype)
    graphdef, state = nnx.split(inference_copy(model))
    key = jax.random.key(0) if key is None else key
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p, kv_cache_dtype=kv_cache_dtype)
    if draft is None:
        return _generate(graphdef, state, tokens, key, max_new_tokens=max_new_tokens, **sampling)
    num_draft = model.cfg.mtp_depth if num_draft is None else num_draft
    plain = min(max(num_draft - 1 - tokens.shape[1], 0), max_new_tokens)
    if plain:
        key, k_plain = jax.random.split(key)
        tokens = _generate(graphdef, state, tokens, k_plain, max_new_tokens=plain, **sampling)
    steps, accepted = 0, jnp.zeros((0,), jnp.int32)
    if max_new_tokens > plain:
        total = tokens.shape[1] + max_new_tokens - plain
        tokens, accepted, steps, *_ = speculative_generate(graphdef, state, tokens, key, num_draft=num_draft,
                                                           max_new_tokens=max_new_tokens - plain, **sampling)
        tokens, steps = tokens[:, :total], int(steps)
        accepted = accepted[:steps]
    if not return_stats:
        return tokens
    return tokens, {"steps": steps, "accepted_per_step": np.asarray(accepted), "num_draft": num_draft,
                    "acceptance_rate": float(np.sum(accepted)) / max(steps * num_draft, 1)}
