"""Block (pre-norm residual around one mixer) and the hybrid language model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import LayerSpec, ModelConfig
from nemojax.nn.attention import Attention, recast_kv_cache
from nemojax.nn.ffn import MLP, MoE
from nemojax.nn.layers import KEEP, Linear, RMSNorm, dense
from nemojax.nn.mamba import Mamba2Mixer
from nemojax.nn.registry import build_mixer, kind_of, param_rule, spec_at
from nemojax.ops import attention as attention_ops, ffn as ffn_ops, moe as moe_ops, ssd as ssd_ops


def residual_std(cfg: ModelConfig) -> float:
    """Init std of the projections that write into the residual stream (GPT-2 style depth scaling)."""
    return cfg.init_std / math.sqrt(2 * len(cfg.layers))


class Block(nnx.Module):
    """x + mixer(RMSNorm(x)); a layer kind without a mixer (no-op) is x -> x."""

    def __init__(self, spec: LayerSpec, cfg: ModelConfig, *, out_std: float, dtype, rngs: nnx.Rngs):
        self.spec = spec
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype) if kind_of(spec).norm else None
        self.mixer = build_mixer(spec, cfg, out_std=out_std, dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, *, dtype, ssm_dtype):
        return None if self.mixer is None else self.mixer.init_cache(batch, max_len, dtype=dtype, ssm_dtype=ssm_dtype)

    def contribution(self, x, cache=None, pos=0, act_dtype=None):
        """What the block adds to the residual stream, mixer(norm(x)), and the updated cache."""
        h = x if self.norm is None else self.norm(x)
        return self.mixer(h if act_dtype is None else h.astype(act_dtype), cache, pos)

    def __call__(self, x, cache=None, pos=0, act_dtype=None):
        """`act_dtype`: the dtype the mixer computes in, when the residual stream `x` is kept wider."""
        if self.mixer is None:
            return x, cache
        y, cache = self.contribution(x, cache, pos, act_dtype)
        return x + y, cache


class ParallelMixer(nnx.Module):
    """The mixer of a `ParallelSpec` layer: sum_b branch_b.contribution(x), each branch a `Block` with its
    own pre-norm and cache (the caches travel as one tuple)."""

    def __init__(self, spec, cfg: ModelConfig, *, out_std: float, dtype, rngs: nnx.Rngs):
        self.spec = spec
        self.branches = nnx.List([Block(b, cfg, out_std=out_std, dtype=dtype, rngs=rngs) for b in spec.branches])

    def init_cache(self, batch: int, max_len: int, *, dtype, ssm_dtype):
        return tuple(b.init_cache(batch, max_len, dtype=dtype, ssm_dtype=ssm_dtype) for b in self.branches)

    def __call__(self, x, cache=None, pos=0):
        caches = (None,) * len(self.branches) if cache is None else cache
        y, new = 0, []
        for branch, c in zip(self.branches, caches):
            y_b, c = branch.contribution(x, c, pos)
            y, new = y + y_b, new + [c]
        return y, None if cache is None else tuple(new)


def run_blocks(blocks, x, caches=None, pos=0, act_dtype=None, collect: bool = False):
    """Apply blocks in order, threading per-block caches (None entries for stateless mixers).
    Returns (x, caches) and, with `collect`, the residual stream after every block."""
    new, outs = [], []
    for i, block in enumerate(blocks):
        x, c = block(x, None if caches is None else caches[i], pos, act_dtype)
        new.append(c)
        if collect:
            outs.append(x)
    caches = None if caches is None else tuple(new)
    return (x, caches, tuple(outs)) if collect else (x, caches)


class MTPDepth(nnx.Module):
    """One multi-token-prediction depth: h' = blocks(eh_proj([enorm(emb(t_{+k})), hnorm(h)])), then final norm."""

    def __init__(self, cfg: ModelConfig, *, out_std: float, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.hnorm = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.eh_proj = Linear(2 * d, d, std=cfg.init_std, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(s, cfg, out_std=out_std, dtype=dtype, rngs=rngs) for s in cfg.mtp_layers])
        self.final_layernorm = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.residual_in_fp32 = cfg.residual_in_fp32

    def init_cache(self, batch: int, max_len: int, *, dtype, ssm_dtype):
        return tuple(b.init_cache(batch, max_len, dtype=dtype, ssm_dtype=ssm_dtype) for b in self.blocks)

    def __call__(self, emb_next, h, cache=None, pos=0):
        """(hidden [B, L, D], normed hidden) or, with a `cache` from `init_cache` holding `pos` positions,
        (hidden, normed hidden, updated cache): speculative decoding drafts with a cache per depth."""
        x = self.eh_proj(jnp.concatenate([self.enorm(emb_next), self.hnorm(h.astype(emb_next.dtype))], axis=-1))
        act_dtype = x.dtype
        x, cache = run_blocks(self.blocks, x.astype(jnp.float32) if self.residual_in_fp32 else x, cache, pos,
                              act_dtype)
        return (x, self.final_layernorm(x)) if cache is None else (x, self.final_layernorm(x), cache)


class HybridLM(nnx.Module):
    """Nemotron-H / Nemotron 3 language model: embeddings, heterogeneous blocks, final norm, LM head.

    `model(tokens)` gives logits. `model.forward(tokens, cache)` runs on top of a cache from
    `init_cache` (prefill, multi-token or single-token decode) and returns the updated cache.
    `model.cfg` is read-only: `replace_layers` is the one way to change layers, and keeps the
    config and the layers in agreement.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self._cfg, self.dtype = cfg, jnp.dtype(dtype)
        d, v = cfg.hidden_size, cfg.vocab_size
        out_std = residual_std(cfg)
        self.embeddings = nnx.Param(cfg.init_std * jax.random.normal(rngs.params(), (v, d), dtype))
        self.layers = nnx.List([Block(s, cfg, out_std=out_std, dtype=dtype, rngs=rngs) for s in cfg.layers])
        self.norm_f = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(
            cfg.init_std * jax.random.normal(rngs.params(), (d, v), dtype))
        self.mtp = nnx.List([MTPDepth(cfg, out_std=out_std, dtype=dtype, rngs=rngs) for _ in range(cfg.mtp_depth)])

    @property
    def cfg(self) -> ModelConfig:
        return self._cfg

    # -------------------------------------------------------------------------------- pieces
    def embed(self, tokens):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [batch, length]; got {tokens.dtype} {tokens.shape}")
        return jnp.take(self.embeddings[...], tokens, axis=0)

    def logits(self, h_normed):
        w = self.embeddings[...].T if self.lm_head is None else self.lm_head[...]
        return dense(h_normed, w).astype(jnp.float32)

    def _run(self, tokens, cache, collect: bool):
        emb = self.embed(tokens)
        x = emb.astype(jnp.float32) if self.cfg.residual_in_fp32 else emb
        pos = 0 if cache is None else cache["pos"]
        out = run_blocks(self.layers, x, None if cache is None else cache["layers"], pos, emb.dtype, collect)
        new_cache = None if cache is None else {"pos": pos + tokens.shape[1], "layers": out[1]}
        return out[0], new_cache, ((x,) + out[2] if collect else None)

    def hidden_states(self, tokens, cache=None):
        """Final hidden states before `norm_f` [B, L, D], and the updated cache."""
        x, cache, _ = self._run(tokens, cache, False)
        return x, cache

    def layer_states(self, tokens):
        """The residual stream entering the first layer and after every layer: a tuple of len(layers) + 1
        arrays [B, L, D] (the last is `hidden_states(tokens)[0]`). Layer i maps states[i] to states[i + 1]:
        the inputs and targets of blockwise distillation."""
        return self._run(tokens, None, True)[2]

    # ------------------------------------------------------------------------------ entry points
    def __call__(self, tokens):
        return self.logits(self.norm_f(self.hidden_states(tokens)[0]))

    def forward(self, tokens, cache):
        """Logits for `tokens` appended after the `cache["pos"]` tokens already in `cache`."""
        h, cache = self.hidden_states(tokens, cache)
        return self.logits(self.norm_f(h)), cache

    def init_cache(self, batch: int, max_len: int, *, kv_cache_dtype: str | None = None):
        """kv_cache_dtype: how attention layers store K and V (`nemojax.nn.attention.KV_CACHE_DTYPES`):
        None (the model's dtype), a float dtype name, "fp8" (E4M3 with the calibrated per-layer scales) or
        "fp8_uncalibrated" (E4M3, scales of 1)."""
        ssm_dtype = jnp.dtype(self.cfg.ssm_cache_dtype)
        layers = tuple(b.init_cache(batch, max_len, dtype=self.dtype, ssm_dtype=ssm_dtype) for b in self.layers)
        return {"pos": jnp.zeros((), jnp.int32), "layers": recast_kv_cache(self, layers, kv_cache_dtype)}

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

    # ------------------------------------------------------------------------------ surgery
    def replace_layers(self, changes: dict, *, rngs: nnx.Rngs | None = None) -> "HybridLM":
        """A new model with layer i replaced per `changes = {i: (spec, module_or_None)}`, and a config
        that says so; the other layers share this model's arrays (not its Variables: updating one model
        in place leaves the other as it is).

        module_or_None: None builds a freshly initialised layer from `rngs` (default `nnx.Rngs(0)`); a
        `Block` is used as it is; a mixer module gets a pre-norm copied from the layer it replaces (or a
        fresh one). Either must have exactly the parameter shapes `spec` implies, else ValueError.
        """
        if not isinstance(changes, dict):
            raise ValueError(f"replace_layers: expected {{index: (spec, module_or_None)}}; got {type(changes).__name__}")
        new_cfg = self.cfg.replace_layers({i: _unpack_change(i, c)[0] for i, c in changes.items()})
        rngs = nnx.Rngs(0) if rngs is None else rngs
        out = nnx.clone(self)
        out._cfg = new_cfg
        out_std = residual_std(new_cfg)
        for i, change in changes.items():
            spec, module = _unpack_change(i, change)
            fresh = lambda r: Block(spec, new_cfg, out_std=out_std, dtype=self.dtype, rngs=r)  # noqa: E731
            expected = nnx.eval_shape(lambda: fresh(nnx.Rngs(0)))
            if module is None:
                block = fresh(rngs)
            elif isinstance(module, Block):
                block = nnx.clone(module)
            else:  # a mixer: its block's pre-norm is the replaced layer's, or a fresh one
                block = expected
                old = self.layers[i].norm
                if block.norm is not None:
                    block.norm = nnx.clone(old) if old is not None else RMSNorm(
                        new_cfg.hidden_size, eps=new_cfg.norm_eps, dtype=self.dtype)
                block.mixer = nnx.clone(module)
            _check_block(i, block, spec, nnx.eval_shape(lambda: fresh(nnx.Rngs(0))))
            out.layers[i] = block
        return out


def _unpack_change(i, change):
    if not (isinstance(change, tuple) and len(change) == 2):
        raise ValueError(f"replace_layers: entry {i} must be (spec, module_or_None); got {change!r}")
    return change


def _shapes(module) -> dict:
    return {path: (v.get_value().shape, jnp.dtype(v.get_value().dtype))
            for path, v in nnx.to_flat_state(nnx.state(module, nnx.Variable))}


def _check_block(i: int, block: Block, spec, expected: Block) -> None:
    for what, have in (("block", block.spec), ("mixer", getattr(block.mixer, "spec", spec))):
        if have != spec:
            raise ValueError(f"replace_layers: layer {i}'s {what} is built for {have!r}, not {spec!r}")
    got, want = _shapes(block), _shapes(expected)
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()), key=str)[:4]
        raise ValueError(f"replace_layers: layer {i}'s module does not have the parameters {spec!r} implies "
                         f"(first differences, as (path, (shape, dtype)): {diff})")


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
        if path[0] in ("embeddings", "lm_head"):
            counts["embedding" if path[0] == "embeddings" else "lm_head"] += n
        if param_rule(path).routed:
            spec = spec_at(cfg.layers[path[1]], path[2:])
            counts["active"] += n * spec.top_k // spec.num_experts
        else:
            counts["active"] += n
    return counts


def configure_kernels(model: nnx.Module, *, ssd=KEEP, ffn=KEEP, moe=KEEP, attention=KEEP) -> None:
    """Sets the `implementation=` every layer of `model` passes to its op: `ssd` for the Mamba
    mixers (`ops.ssd.ssd`), `ffn` for the dense MLPs and shared experts (`ops.ffn.ffn`), `moe` for
    the routed experts (`ops.moe.moe_ffn`), `attention` for attention (`ops.attention.attention`).
    None: the op's measured default for the backend. An argument not given leaves that setting as
    it is, so calls compose."""
    ops = {Mamba2Mixer: ("ssd", ssd, ssd_ops.IMPLEMENTATIONS), MLP: ("ffn", ffn, ffn_ops.IMPLEMENTATIONS),
           MoE: ("moe", moe, moe_ops.IMPLEMENTATIONS), Attention: ("attention", attention,
                                                                   attention_ops.IMPLEMENTATIONS)}
    for name, value, allowed in ops.values():
        if value is not KEEP and value is not None and value not in allowed:
            raise ValueError(f"configure_kernels: {name} must be None or one of {tuple(allowed)}; got {value!r}")
    for _, m in nnx.iter_modules(model):
        name, value, _ = ops.get(type(m), (None, KEEP, None))
        if value is not KEEP:
            m.implementation = value
