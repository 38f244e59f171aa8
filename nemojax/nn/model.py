"""Block (pre-norm residual around one mixer) and the hybrid language model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import AttentionSpec, LayerSpec, MambaSpec, MLPSpec, ModelConfig, MoESpec
from nemojax.nn.attention import Attention
from nemojax.nn.ffn import MLP, MoE
from nemojax.nn.layers import Linear, RMSNorm, dense
from nemojax.nn.mamba import Mamba2Mixer
from nemojax.ops import ffn as ffn_ops, moe as moe_ops, ssd as ssd_ops


def make_mixer(spec: LayerSpec, cfg: ModelConfig, *, out_std: float, dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    if isinstance(spec, MambaSpec):
        return Mamba2Mixer(spec, d, eps=cfg.norm_eps, out_std=out_std, dtype=dtype, rngs=rngs)
    if isinstance(spec, AttentionSpec):
        return Attention(spec, d, out_std=out_std, dtype=dtype, rngs=rngs)
    if isinstance(spec, MLPSpec):
        return MLP.from_spec(spec, d, out_std=out_std, dtype=dtype, rngs=rngs)
    if isinstance(spec, MoESpec):
        return MoE(spec, d, out_std=out_std, dtype=dtype, rngs=rngs)
    raise ValueError(f"unknown layer spec {spec!r}")


class Block(nnx.Module):
    """x + mixer(RMSNorm(x))."""

    def __init__(self, spec: LayerSpec, cfg: ModelConfig, *, out_std: float, dtype, rngs: nnx.Rngs):
        self.spec = spec
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
        self.mixer = make_mixer(spec, cfg, out_std=out_std, dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype, ssm_dtype):
        if isinstance(self.mixer, Mamba2Mixer):
            return self.mixer.init_cache(batch, dtype, ssm_dtype)
        if isinstance(self.mixer, Attention):
            return self.mixer.init_cache(batch, max_len, dtype)
        return None

    def __call__(self, x, cache=None, pos=0):
        h = self.norm(x)
        if isinstance(self.mixer, Attention):
            y, cache = self.mixer(h, cache, pos)
        else:
            y, cache = self.mixer(h, cache)
        return x + y, cache


def run_blocks(blocks, x, caches=None, pos=0):
    """Apply blocks in order, threading per-block caches (None entries for stateless mixers)."""
    new = []
    for i, block in enumerate(blocks):
        x, c = block(x, None if caches is None else caches[i], pos)
        new.append(c)
    return x, (None if caches is None else tuple(new))


class MTPDepth(nnx.Module):
    """One multi-token-prediction depth: h' = blocks(eh_proj([enorm(emb(t_{+k})), hnorm(h)])), then final norm."""

    def __init__(self, cfg: ModelConfig, *, out_std: float, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.hnorm = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.eh_proj = Linear(2 * d, d, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(s, cfg, out_std=out_std, dtype=dtype, rngs=rngs) for s in cfg.mtp_layers])
        self.final_layernorm = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)

    def __call__(self, emb_next, h):
        x = self.eh_proj(jnp.concatenate([self.enorm(emb_next), self.hnorm(h)], axis=-1))
        x, _ = run_blocks(self.blocks, x)
        return x, self.final_layernorm(x)


class HybridLM(nnx.Module):
    """Nemotron-H / Nemotron 3 language model: embeddings, heterogeneous blocks, final norm, LM head.

    `model(tokens)` gives logits. `model.forward(tokens, cache)` runs on top of a cache from
    `init_cache` (prefill, multi-token or single-token decode) and returns the updated cache.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg, self.dtype = cfg, jnp.dtype(dtype)
        d, v = cfg.hidden_size, cfg.vocab_size
        out_std = 0.02 / math.sqrt(2 * len(cfg.layers))  # GPT-2 style residual-branch scaling
        self.embeddings = nnx.Param(0.02 * jax.random.normal(rngs.params(), (v, d), dtype))
        self.layers = nnx.List([Block(s, cfg, out_std=out_std, dtype=dtype, rngs=rngs) for s in cfg.layers])
        self.norm_f = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (d, v), dtype))
        self.mtp = nnx.List([MTPDepth(cfg, out_std=out_std, dtype=dtype, rngs=rngs) for _ in range(cfg.mtp_depth)])

    # -------------------------------------------------------------------------------- pieces
    def embed(self, tokens):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [batch, length]; got {tokens.dtype} {tokens.shape}")
        return jnp.take(self.embeddings[...], tokens, axis=0)

    def logits(self, h_normed):
        w = self.embeddings[...].T if self.lm_head is None else self.lm_head[...]
        return dense(h_normed, w).astype(jnp.float32)

    def hidden_states(self, tokens, cache=None):
        """Final hidden states before `norm_f` [B, L, D], and the updated cache."""
        pos = 0 if cache is None else cache["pos"]
        x, layer_caches = run_blocks(self.layers, self.embed(tokens), None if cache is None else cache["layers"], pos)
        new_cache = None if cache is None else {"pos": pos + tokens.shape[1], "layers": layer_caches}
        return x, new_cache

    # ------------------------------------------------------------------------------ entry points
    def __call__(self, tokens):
        return self.logits(self.norm_f(self.hidden_states(tokens)[0]))

    def forward(self, tokens, cache):
        """Logits for `tokens` appended after the `cache["pos"]` tokens already in `cache`."""
        h, cache = self.hidden_states(tokens, cache)
        return self.logits(self.norm_f(h)), cache

    def init_cache(self, batch: int, max_len: int):
        ssm_dtype = jnp.dtype(self.cfg.ssm_cache_dtype)
        return {
            "pos": jnp.zeros((), jnp.int32),
            "layers": tuple(b.init_cache(batch, max_len, self.dtype, ssm_dtype) for b in self.layers),
        }

    def mtp_logits(self, tokens, h=None):
        """Logits of every MTP depth: depth k (1-based) at position t predicts token t + k + 1.

        The embedding input of depth k at position t is token t + k; the last k positions have no
        such token (it is padded with id 0), so their depth-k logits are not meaningful.
        """
        if not self.mtp:
            raise ValueError("this model has no MTP layers (config.mtp_depth == 0)")
        if h is None:
            h = self.hidden_states(tokens)[0]
        out = []
        for k, depth in enumerate(self.mtp, start=1):
            shifted = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))
            h, h_normed = depth(self.embed(shifted), h)
            out.append(self.logits(h_normed))
        return out


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from shapes alone (`nnx.eval_shape`, nothing materialised).

    `total` counts every parameter of the main model (embeddings and LM head included, MTP
    excluded; `mtp` reports it separately). `active` is what one token touches in a forward
    pass: everything except the routed experts it is not sent to, i.e. routed-expert weights
    count top_k / num_experts; embeddings and LM head count in full.
    """
    model = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0)))
    counts = {"total": 0, "active": 0, "mtp": 0, "embedding": 0, "lm_head": 0}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = math.prod(var.get_value().shape)
        if path[0] == "mtp":
            counts["mtp"] += n
            continue
        counts["total"] += n
        if path[0] == "embeddings":
            counts["embedding"] += n
        elif path[0] == "lm_head":
            counts["lm_head"] += n
        spec = cfg.layers[path[1]] if path[0] == "layers" else None
        routed = isinstance(spec, MoESpec) and path[2:] in (("mixer", "up_proj"), ("mixer", "down_proj"))
        counts["active"] += n * spec.top_k // spec.num_experts if routed else n
    return counts


def configure_kernels(model: nnx.Module, *, ssd: str | None = None, ffn: str | None = None,
                      moe: str | None = None) -> None:
    """Sets the `implementation=` every layer of `model` passes to its op: `ssd` for the Mamba
    mixers (`ops.ssd.ssd`), `ffn` for the dense MLPs and shared experts (`ops.ffn.ffn`), `moe` for
    the routed experts (`ops.moe.moe_ffn`; `nn.ffn.configure_moe` sets it too, with the training
    options). None: each op's measured default for the backend."""
    for field, value, allowed in (("ssd", ssd, ssd_ops.IMPLEMENTATIONS), ("ffn", ffn, ffn_ops.IMPLEMENTATIONS),
                                  ("moe", moe, moe_ops.IMPLEMENTATIONS)):
        if value is not None and value not in allowed:
            raise ValueError(f"configure_kernels: {field} must be None or one of {allowed}; got {value!r}")
    for _, m in nnx.iter_modules(model):
        if isinstance(m, Mamba2Mixer):
            m.implementation = ssd
        elif isinstance(m, MLP):
            m.implementation = ffn
        elif isinstance(m, MoE):
            m.implementation = moe
