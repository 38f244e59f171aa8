"""Calibrated FP8 KV cache: per attention layer, one E4M3 scale for K and one for V, max-calibrated on
sample text (scale = amax / 448), attached to the model and saved with it as `<layer>.k_scale` /
`<layer>.v_scale` fp32 scalars (the names HF / vLLM checkpoints give them). `nj.generate(...,
kv_cache_dtype="fp8")` then stores K and V as E4M3 codes of K / k_scale and V / v_scale."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.nn.attention import KVCacheScale, kv_cache_layers, layer_cache
from nemojax.nn.ffn import inference_copy
from nemojax.quant.formats import fp8_scale

SCALE_SUFFIXES = (".k_scale", ".v_scale")


def kv_amax(model: nnx.Module, batches: Iterable) -> dict[str, tuple[float, float]]:
    """Per attention layer of the main stack (`kv_cache_layers` names), (max |K|, max |V|) over the
    tokens of `batches` (int arrays [B, L]) as a cache in the model's dtype holds them."""
    layers = kv_cache_layers(model)
    graphdef, state = nnx.split(inference_copy(model))

    @jax.jit
    def amax(state, tokens):
        m = nnx.merge(graphdef, state)
        _, cache = m.forward(tokens, m.init_cache(*tokens.shape))
        return {name: tuple(jnp.max(jnp.abs(layer_cache(cache["layers"], index)[t].astype(jnp.float32)))
                            for t in ("k", "v"))
                for name, (index, _) in layers.items()}

    out = None
    for tokens in batches:
        got = jax.device_get(amax(state, jnp.asarray(tokens, jnp.int32)))
        out = got if out is None else jax.tree.map(max, out, got)
    if out is None:
        raise ValueError("batches is empty: calibration needs at least one batch of tokens")
    return {name: (float(k), float(v)) for name, (k, v) in out.items()}


def calibrate_kv_scales(model: nnx.Module, batches: Iterable) -> dict[str, tuple[float, float]]:
    """Per attention layer ("layers.2.mixer"), the FP8 E4M3 scales (k_scale, v_scale) = amax / 448 of its
    keys and values over `batches` (int token arrays [B, L]); 1 for a tensor that is all zeros. Attach
    them with `set_kv_scales`."""
    return {name: tuple(float(fp8_scale(a)) for a in pair) for name, pair in kv_amax(model, batches).items()}


def set_kv_scales(model: nnx.Module, scales: Mapping[str, tuple[float, float]]) -> None:
    """Attach per-layer (k_scale, v_scale) (as `calibrate_kv_scales` returns them) to the model's
    attention layers, in place. Names must be attention layers of the model; scales finite and > 0."""
    layers = kv_cache_layers(model)
    unknown = sorted(set(scales) - set(layers))
    if unknown:
        raise ValueError(f"scales name {unknown}, which are not attention layers of this model; "
                         f"its attention layers: {sorted(layers)}")
    for name, pair in scales.items():
        if len(pair) != 2 or not all(math.isfinite(float(s)) and float(s) > 0 for s in pair):
            raise ValueError(f"scales[{name!r}] must be (k_scale, v_scale), both finite and > 0; got {pair!r}")
        module = layers[name][1]
        module.k_scale, module.v_scale = (KVCacheScale(jnp.asarray(s, jnp.float32)) for s in pair)


def kv_scales(model: nnx.Module) -> dict[str, tuple[float, float]]:
    """The (k_scale, v_scale) attached to each calibrated attention layer."""
    return {name: (float(m.k_scale[...]), float(m.v_scale[...]))
            for name, (_, m) in kv_cache_layers(model).items() if m.k_scale is not None}


def _checkpoint_prefixes(model: nnx.Module, entries) -> dict[str, str]:
    """Attention layer name -> its checkpoint prefix ("model.layers.2.mixer"), read off the entry of its
    k_proj weight so that the scales sit next to the projections whatever the nesting."""
    by_path = {e.path: e.name for e in entries}
    return {name: by_path[(*(int(p) if p.isdigit() else p for p in name.split(".")), "k_proj", "kernel")]
            .removesuffix(".k_proj.weight") for name in kv_cache_layers(model)}


def checkpoint_scales(model: nnx.Module, entries) -> dict[str, np.ndarray]:
    """The calibrated scales as checkpoint tensors, {"<prefix>.k_scale": fp32 scalar, ...}; `entries`:
    the model's checkpoint entries (`nemojax.io.hf.checkpoint_entries`)."""
    prefixes = _checkpoint_prefixes(model, entries)
    return {f"{prefixes[name]}{suffix}": np.asarray(s, np.float32)
            for name, pair in kv_scales(model).items() for suffix, s in zip(SCALE_SUFFIXES, pair)}


def scales_from_checkpoint(model: nnx.Module, entries, tensors: Mapping[str, np.ndarray]) -> dict:
    """The inverse of `checkpoint_scales`: {layer: (k_scale, v_scale)} from tensors named
    "<prefix>.k_scale" / ".v_scale". Raises naming a tensor that belongs to no attention layer or is not
    a scalar, and a layer that has only one of its two scales."""
    layer_of = {prefix: name for name, prefix in _checkpoint_prefixes(model, entries).items()}
    found: dict[str, dict[str, float]] = {}
    for tensor_name, t in tensors.items():
        prefix, suffix = tensor_name[:-len(".k_scale")], tensor_name[-len(".k_scale"):]
        if prefix not in layer_of or suffix not in SCALE_SUFFIXES:
            raise ValueError(f"unexpected tensor {tensor_name!r}: KV-cache scales belong to the attention layers "
                             f"{sorted(layer_of)}")
        if np.shape(t) != ():
            raise ValueError(f"tensor {tensor_name!r} has shape {tuple(np.shape(t))}; a KV-cache scale is a scalar ()")
        found.setdefault(layer_of[prefix], {})[suffix] = float(np.asarray(t, np.float32))
    halves = {name: sorted(set(SCALE_SUFFIXES) - set(got)) for name, got in found.items()}
    incomplete = {name: missing for name, missing in halves.items() if missing}
    if incomplete:
        raise ValueError(f"KV-cache scales come in pairs; missing {incomplete}")
    return {name: (got[".k_scale"], got[".v_scale"]) for name, got in found.items()}
