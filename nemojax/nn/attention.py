"""Causal GQA attention without positional embedding (the '*' layer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import AttentionSpec
from nemojax.nn.layers import Linear
from nemojax.ops.attention import attention


class Attention(nnx.Module):
    def __init__(self, spec: AttentionSpec, hidden: int, *, std: float, out_std: float, dtype, rngs: nnx.Rngs):
        self.spec = spec
        hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = Linear(hidden, hq * d, std=std, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(hidden, hkv * d, std=std, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(hidden, hkv * d, std=std, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(hq * d, hidden, std=out_std, dtype=dtype, rngs=rngs)
        self.implementation: str | None = None  # `ops.attention.attention`'s switch: None | "xla" | "jax_nn"

    def init_cache(self, batch: int, max_len: int, *, dtype, ssm_dtype):
        # [B, Hkv, S, Dh]: the layout the score and value contractions read, so a decode step
        # does not transpose the whole cache.
        shape = (batch, self.spec.num_kv_heads, max_len, self.spec.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(self, x, cache=None, pos=0):
        """`pos`: number of tokens already in `cache` (the absolute position of x[:, 0])."""
        s = self.spec
        b, l, _ = x.shape
        q = self.q_proj(x).reshape(b, l, s.num_heads, s.head_dim)
        k = self.k_proj(x).reshape(b, l, s.num_kv_heads, s.head_dim)
        v = self.v_proj(x).reshape(b, l, s.num_kv_heads, s.head_dim)
        q_pos = jnp.broadcast_to(pos + jnp.arange(l, dtype=jnp.int32), (b, l))
        new_cache = None
        if cache is None:
            k_pos = q_pos
        else:
            new_cache = {name: jax.lax.dynamic_update_slice(cache[name], t.astype(cache[name].dtype).swapaxes(1, 2),
                                                            (0, 0, pos, 0))
                         for name, t in (("k", k), ("v", v))}
            k, v = new_cache["k"].swapaxes(1, 2), new_cache["v"].swapaxes(1, 2)
            slots = jnp.arange(k.shape[1], dtype=jnp.int32)
            k_pos = jnp.broadcast_to(jnp.where(slots < pos + l, slots, -1), (b, k.shape[1]))
        o = attention(q, k.astype(q.dtype), v.astype(q.dtype), q_pos, k_pos, sliding_window=s.sliding_window,
                      implementation=self.implementation)
        return self.o_proj(o.reshape(b, l, s.num_heads * s.head_dim)), new_cache
