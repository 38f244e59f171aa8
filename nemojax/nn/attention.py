"""Causal GQA attention without positional embedding (the '*' layer), and its KV cache: in the model's
dtype, in another float dtype, or FP8 E4M3 codes with one scale for K and one for V per layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import AttentionSpec
from nemojax.nn.layers import Linear
from nemojax.ops.attention import attention
from nemojax.quant.formats import decode_fp8, encode_fp8

# What `HybridLM.init_cache(kv_cache_dtype=...)` and `nj.generate(kv_cache_dtype=...)` accept. None: the
# model's dtype. "fp8": E4M3 with the model's calibrated per-layer scales; "fp8_uncalibrated": E4M3 with
# scales of 1 (the codes are K and V themselves, saturating at +-448).
FLOAT_KV_CACHE_DTYPES = ("float32", "bfloat16", "float16")
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_uncalibrated")
KV_CACHE_DTYPES = (None, *FLOAT_KV_CACHE_DTYPES, *FP8_KV_CACHE_DTYPES)


class KVCacheScale(nnx.Variable):
    """A calibrated FP8 KV-cache scale (fp32 scalar, amax / 448): model state that is not a parameter, so
    optimisers and parameter counts leave it alone."""


class Attention(nnx.Module):
    def __init__(self, spec: AttentionSpec, hidden: int, *, std: float, out_std: float, dtype, rngs: nnx.Rngs):
        self.spec = spec
        hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = Linear(hidden, hq * d, std=std, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(hidden, hkv * d, std=std, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(hidden, hkv * d, std=std, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(hq * d, hidden, std=out_std, dtype=dtype, rngs=rngs)
        self.implementation: str | None = None  # `ops.attention.attention`'s switch: None | "xla" | "jax_nn"
        # KVCacheScale each once calibrated (`nemojax.quant.kv_cache`); only an FP8 cache reads them
        self.k_scale: KVCacheScale | None = nnx.data(None)
        self.v_scale: KVCacheScale | None = nnx.data(None)

    def init_cache(self, batch: int, max_len: int, *, dtype, ssm_dtype):
        # [B, Hkv, S, Dh]: the layout the score and value contractions read, so a decode step
        # does not transpose the whole cache.
        shape = (batch, self.spec.num_kv_heads, max_len, self.spec.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def recast_cache(self, cache, kv_cache_dtype: str):
        """An empty cache of `cache`'s shape stored as `kv_cache_dtype` (not None). An FP8 cache
        holds float8_e4m3fn codes K / k_scale and V / v_scale and the two fp32 scales it was written with."""
        shape = cache["k"].shape
        if kv_cache_dtype in FLOAT_KV_CACHE_DTYPES:
            return {"k": jnp.zeros(shape, kv_cache_dtype), "v": jnp.zeros(shape, kv_cache_dtype)}
        # "fp8" on a layer without scales is refused by `check_kv_cache_dtype` first
        scales = (self.k_scale[...], self.v_scale[...]) if kv_cache_dtype == "fp8" else (1, 1)
        return {"k": jnp.zeros(shape, jnp.float8_e4m3fn), "v": jnp.zeros(shape, jnp.float8_e4m3fn),
                "k_scale": jnp.asarray(scales[0], jnp.float32), "v_scale": jnp.asarray(scales[1], jnp.float32)}

    def __call__(self, x, cache=None, pos=0):
        """`pos`: number of tokens already in `cache` (the absolute position of x[:, 0]). With a cache the
        attention reads K and V back from it, so every query sees them as the cache stores them."""
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
            new_cache = dict(cache)
            for name, t in (("k", k), ("v", v)):
                new_cache[name] = jax.lax.dynamic_update_slice(cache[name], _encode(cache, name, t.swapaxes(1, 2)),
                                                               (0, 0, pos, 0))
            k, v = (_decode(new_cache, name, q.dtype).swapaxes(1, 2) for name in ("k", "v"))
            slots = jnp.arange(k.shape[1], dtype=jnp.int32)
            k_pos = jnp.broadcast_to(jnp.where(slots < pos + l, slots, -1), (b, k.shape[1]))
        o = attention(q, k.astype(q.dtype), v.astype(q.dtype), q_pos, k_pos, sliding_window=s.sliding_window,
                      implementation=self.implementation)
        return self.o_proj(o.reshape(b, l, s.num_heads * s.head_dim)), new_cache


def _encode(cache, name: str, t):
    """t as cache[name] stores it: FP8 codes of t / scale when the cache has a scale, else a cast."""
    scale = cache.get(f"{name}_scale")
    return t.astype(cache[name].dtype) if scale is None else encode_fp8(t, scale)


def _decode(cache, name: str, dtype):
    scale = cache.get(f"{name}_scale")
    return cache[name].astype(dtype) if scale is None else decode_fp8(cache[name], scale, dtype)


def kv_cache_layers(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], Attention]]:
    """Every attention layer of the model's main stack (the layers `forward` caches; MTP depths are not):
    its name ("layers.2.mixer", "layers.4.mixer.branches.1.mixer") -> (index of its cache in
    cache["layers"], module). Caches nest as tuples in the order of the module lists that hold the
    layers, so the index is the path's integers (layer, then branch)."""
    return {".".join(map(str, path)): (tuple(p for p in path[1:] if isinstance(p, int)), m)
            for path, m in nnx.iter_modules(model) if isinstance(m, Attention) and path[0] == "layers"}


def layer_cache(layers, index: tuple[int, ...]):
    for i in index:
        layers = layers[i]
    return layers


def _replace(layers, index: tuple[int, ...], value):
    if not index:
        return value
    i = index[0]
    return layers[:i] + (_replace(layers[i], index[1:], value),) + layers[i + 1:]


def check_kv_cache_dtype(model: nnx.Module, kv_cache_dtype) -> None:
    """Raises ValueError unless `model` can cache K and V as `kv_cache_dtype`."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}; got {kv_cache_dtype!r}")
    if kv_cache_dtype == "fp8":
        missing = [name for name, (_, m) in kv_cache_layers(model).items() if m.k_scale is None or m.v_scale is None]
        if missing:
            raise ValueError(f"kv_cache_dtype='fp8' uses the model's calibrated KV-cache scales, but attention "
                             f"layer(s) {missing} have none: calibrate them with nemojax.quant.kv_cache."
                             "calibrate_kv_scales(model, batches) and attach them with set_kv_scales(model, scales), "
                             "load a checkpoint saved with scales, or pass kv_cache_dtype='fp8_uncalibrated' "
                             "(scales of 1)")


def recast_kv_cache(model: nnx.Module, layers: tuple, kv_cache_dtype) -> tuple:
    """cache["layers"] of `model.init_cache` with every attention layer's K/V stored as `kv_cache_dtype`."""
    check_kv_cache_dtype(model, kv_cache_dtype)
    if kv_cache_dtype is None:
        return layers
    for index, m in kv_cache_layers(model).values():
        layers = _replace(layers, index, m.recast_cache(layer_cache(layers, index), kv_cache_dtype))
    return layers
