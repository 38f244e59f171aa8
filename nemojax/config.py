"""Model configuration: one frozen spec per layer, HF `config.json` mapping, presets.

Every layer carries its own spec, so heterogeneous models (Puzzle children, FFN-fused
blocks, per-layer expert counts) are ordinary configs. Specs are frozen dataclasses:
hashable, usable as static arguments to `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

INF = float("inf")


@dataclass(frozen=True)
class MambaSpec:
    """Mamba-2 mixer: in_proj -> [z | xBC | dt], causal conv on xBC, SSD, gated group RMSNorm."""

    num_heads: int
    head_dim: int
    n_groups: int
    state_size: int
    conv_kernel: int = 4
    chunk_size: int = 128
    conv_bias: bool = True
    proj_bias: bool = False
    dt_limit: tuple[float, float] = (0.0, INF)
    kind: ClassVar[str] = "mamba"
    symbol: ClassVar[str] = "M"

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.state_size


@dataclass(frozen=True)
class AttentionSpec:
    """Causal GQA without positional embedding (NemotronH attention is NoPE)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    kind: ClassVar[str] = "attention"
    symbol: ClassVar[str] = "*"


@dataclass(frozen=True)
class MLPSpec:
    """Non-gated squared-ReLU FFN: down(relu(up(x))^2)."""

    intermediate_size: int
    bias: bool = False
    kind: ClassVar[str] = "mlp"
    symbol: ClassVar[str] = "-"


@dataclass(frozen=True)
class MoESpec:
    """Sigmoid-routed MoE with relu^2 experts, optional shared expert and LatentMoE projections."""

    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int = 0  # 0: no shared expert
    latent_size: int | None = None  # LatentMoE: experts live in this width
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    bias: bool = False
    kind: ClassVar[str] = "moe"
    symbol: ClassVar[str] = "E"


LayerSpec = Union[MambaSpec, AttentionSpec, MLPSpec, MoESpec]
LAYER_KINDS = {s.symbol: s for s in (MambaSpec, AttentionSpec, MLPSpec, MoESpec)}
# HF `layers_block_type` names (new and legacy) -> pattern symbols.
HF_BLOCK_TYPES = {
    "linear_attention": "M", "mamba": "M",
    "full_attention": "*", "attention": "*",
    "mlp": "-",
    "moe": "E",
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    layers: tuple[LayerSpec, ...]
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # Multi-token prediction: `mtp_depth` modules, each running the block pattern `mtp_layers`.
    mtp_layers: tuple[LayerSpec, ...] = ()
    mtp_depth: int = 0
    ssm_cache_dtype: str = "float32"
    name: str = ""
    # HF config fields without effect on the math, kept so `to_hf` round-trips them.
    hf_extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self):
        _check_positive(self, "vocab_size", "hidden_size")
        if not self.layers:
            raise ValueError("ModelConfig.layers must hold at least one LayerSpec")
        for where, specs in (("layers", self.layers), ("mtp_layers", self.mtp_layers)):
            for i, spec in enumerate(specs):
                _validate_spec(spec, f"{where}[{i}]")
        if self.mtp_depth < 0 or (self.mtp_depth > 0 and not self.mtp_layers):
            raise ValueError(
                f"mtp_depth={self.mtp_depth} needs a non-empty mtp_layers pattern (and must be >= 0)"
            )
        if self.ssm_cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"ssm_cache_dtype must be one of float32, bfloat16, float16; got {self.ssm_cache_dtype!r}"
            )

    @property
    def pattern(self) -> str:
        return "".join(s.symbol for s in self.layers)

    @property
    def mtp_pattern(self) -> str:
        return "".join(s.symbol for s in self.mtp_layers)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF mapping
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | Path) -> "ModelConfig":
        """Build from an HF NemotronH `config.json` (dict, file, or checkpoint directory)."""
        if not isinstance(hf, dict):
            path = Path(hf)
            hf = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        return _from_hf(hf)

    def to_hf(self) -> dict[str, Any]:
        """An HF NemotronH config dict that transformers loads into the same model."""
        return _to_hf(self)


def _check_positive(obj, *names):
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be a positive int; got {v!r}")


def _validate_spec(spec, where: str) -> None:
    if not isinstance(spec, (MambaSpec, AttentionSpec, MLPSpec, MoESpec)):
        raise ValueError(f"{where}: expected a MambaSpec/AttentionSpec/MLPSpec/MoESpec, got {type(spec).__name__}")
    if isinstance(spec, MambaSpec):
        _check_positive(spec, "num_heads", "head_dim", "n_groups", "state_size", "conv_kernel", "chunk_size")
        if spec.num_heads % spec.n_groups:
            raise ValueError(
                f"{where}: mamba num_heads={spec.num_heads} must be divisible by n_groups={spec.n_groups}"
            )
        lo, hi = spec.dt_limit
        if not 0.0 <= lo < hi:
            raise ValueError(f"{where}: dt_limit must satisfy 0 <= lo < hi; got {spec.dt_limit}")
    elif isinstance(spec, AttentionSpec):
        _check_positive(spec, "num_heads", "num_kv_heads", "head_dim")
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(
                f"{where}: attention num_heads={spec.num_heads} must be divisible by "
                f"num_kv_heads={spec.num_kv_heads}"
            )
        if spec.sliding_window is not None and spec.sliding_window <= 0:
            raise ValueError(f"{where}: sliding_window must be None or > 0; got {spec.sliding_window}")
    elif isinstance(spec, MLPSpec):
        _check_positive(spec, "intermediate_size")
    else:
        _check_positive(spec, "num_experts", "top_k", "intermediate_size", "n_group", "topk_group")
        if spec.num_experts % spec.n_group:
            raise ValueError(f"{where}: num_experts={spec.num_experts} must be divisible by n_group={spec.n_group}")
        if spec.topk_group > spec.n_group:
            raise ValueError(f"{where}: topk_group={spec.topk_group} must be <= n_group={spec.n_group}")
        if spec.top_k > spec.topk_group * (spec.num_experts // spec.n_group):
            raise ValueError(
                f"{where}: top_k={spec.top_k} exceeds the experts reachable in topk_group={spec.topk_group} "
                f"groups of {spec.num_experts // spec.n_group}"
            )
        if spec.shared_intermediate_size < 0:
            raise ValueError(f"{where}: shared_intermediate_size must be >= 0")
        if spec.latent_size is not None and spec.latent_size <= 0:
            raise ValueError(f"{where}: latent_size must be None or > 0; got {spec.latent_size}")


# HF field -> (legacy alias). The legacy names are accepted on input.
_HF_LEGACY = {
    "n_groups": "mamba_n_groups",
    "conv_kernel": "mamba_d_conv",
    "expand": "mamba_expand",
    "time_step_min": "mamba_dt_min",
    "time_step_max": "mamba_dt_max",
    "time_step_limit": "mamba_dt_limit",
    "time_step_floor": "mamba_dt_init_floor",
    "use_conv_bias": "mamba_conv_bias",
    "chunk_size": "mamba_chunk_size",
}
# Fields that only affect initialisation, caching policy or training-time regularisation.
_HF_NO_MATH = {
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "num_logits_to_keep", "pad_token_id", "bos_token_id", "eos_token_id",
    "max_position_embeddings", "initializer_range", "rescale_prenorm_residual", "residual_in_fp32",
    "use_mamba_kernels", "time_step_min", "time_step_max", "time_step_floor", "expand",
    "attention_dropout", "hidden_dropout", "output_router_logits", "moe_shared_expert_overlap",
    "num_hidden_layers", "mamba_proj_bias", "n_shared_experts", "router_aux_loss_coef",
    "output_attentions", "output_hidden_states", "return_dict", "sliding_window_pattern",
    "_name_or_path", "tokenizer_class", "quantization_config", "name_or_path",
}


def _pattern_to_symbols(hf: dict[str, Any], list_key: str, pattern_key: str) -> str:
    if hf.get(list_key) is not None:
        types = hf[list_key]
        bad = [t for t in types if t not in HF_BLOCK_TYPES]
        if bad:
            raise ValueError(f"{list_key} has unknown block types {bad}; allowed: {sorted(HF_BLOCK_TYPES)}")
        return "".join(HF_BLOCK_TYPES[t] for t in types)
    pattern = hf.get(pattern_key) or ""
    bad = sorted(set(pattern) - set(LAYER_KINDS))
    if bad:
        raise ValueError(f"{pattern_key} has unknown layer symbols {bad}; allowed: M (mamba), * (attention), - (mlp), E (moe)")
    return pattern


def _as_float(v) -> float:
    """transformers writes non-finite floats into config.json as {"__float__": "Infinity"}."""
    return float(v["__float__"]) if isinstance(v, dict) else float(v)


def _from_hf(hf_in: dict[str, Any]) -> ModelConfig:
    hf = dict(hf_in)
    for new, old in _HF_LEGACY.items():
        if old in hf:
            hf.setdefault(new, hf.pop(old))
    if hf.get("model_type", "nemotron_h") != "nemotron_h":
        raise ValueError(f"model_type must be 'nemotron_h'; got {hf.get('model_type')!r}")
    for key, allowed in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if hf.get(key, allowed) != allowed:
            raise ValueError(f"{key}={hf[key]!r} is not supported; NemotronH uses {allowed!r}")
    if hf.get("attention_bias"):
        raise ValueError("attention_bias=True is not supported: NemotronH attention projections have no bias")
    if hf.get("n_shared_experts", 1) not in (0, 1):
        raise ValueError(f"n_shared_experts={hf['n_shared_experts']} is not supported (0 or 1)")

    pattern = _pattern_to_symbols(hf, "layers_block_type", "hybrid_override_pattern")
    if not pattern:
        raise ValueError("config needs `layers_block_type` or `hybrid_override_pattern`")
    mtp_depth = int(hf.get("num_nextn_predict_layers", 0) or 0)
    mtp_pattern = _pattern_to_symbols(hf, "mtp_layers_block_type", "mtp_hybrid_override_pattern")
    if mtp_depth and not mtp_pattern:
        mtp_pattern = "*E"  # HF default for mtp_layers_block_type

    hidden = hf.get("hidden_size", 4096)
    num_heads = hf.get("num_attention_heads", 32)
    time_step_limit = tuple(_as_float(v) for v in hf.get("time_step_limit", (0.0, INF)))
    share_experts = hf.get("n_shared_experts", 1)
    spec_of = {
        "M": MambaSpec(
            num_heads=hf.get("mamba_num_heads", 128),
            head_dim=hf.get("mamba_head_dim", 64),
            n_groups=hf.get("n_groups", 8),
            state_size=hf.get("ssm_state_size", 128),
            conv_kernel=hf.get("conv_kernel", 4),
            chunk_size=hf.get("chunk_size", 128),
            conv_bias=hf.get("use_conv_bias", True),
            proj_bias=hf.get("use_bias", False),
            dt_limit=time_step_limit,
        ),
        "*": AttentionSpec(
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            sliding_window=hf.get("sliding_window"),
        ),
        "-": MLPSpec(intermediate_size=hf.get("intermediate_size", 21504), bias=hf.get("mlp_bias", False)),
        "E": MoESpec(
            num_experts=hf.get("n_routed_experts", 8),
            top_k=hf.get("num_experts_per_tok", 2),
            intermediate_size=hf.get("moe_intermediate_size", 7688),
            shared_intermediate_size=hf.get("moe_shared_expert_intermediate_size", 7688) if share_experts else 0,
            latent_size=hf.get("moe_latent_size"),
            n_group=hf.get("n_group", 1),
            topk_group=hf.get("topk_group", 1),
            norm_topk_prob=hf.get("norm_topk_prob", True),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            bias=hf.get("mlp_bias", False),
        ),
    }
    math_keys = {
        "vocab_size", "hidden_size", "layers_block_type", "hybrid_override_pattern", "num_attention_heads",
        "num_key_value_heads", "head_dim", "sliding_window", "attention_bias", "intermediate_size",
        "mlp_hidden_act", "mlp_bias", "mamba_num_heads", "mamba_head_dim", "mamba_hidden_act", "n_groups",
        "ssm_state_size", "conv_kernel", "chunk_size", "use_conv_bias", "use_bias", "time_step_limit",
        "mamba_ssm_cache_dtype", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
        "moe_shared_expert_intermediate_size", "moe_latent_size", "n_group", "topk_group", "norm_topk_prob",
        "routed_scaling_factor", "num_nextn_predict_layers", "mtp_layers_block_type",
        "mtp_hybrid_override_pattern", "layer_norm_epsilon", "tie_word_embeddings",
    }
    unknown = sorted(set(hf) - math_keys - _HF_NO_MATH)
    if unknown:
        warnings.warn(f"config.json fields not understood by nemojax (ignored): {unknown}", stacklevel=3)
    if hf.get("sliding_window") is not None:
        warnings.warn(
            "sliding_window is applied to every attention layer; note that transformers' NemotronH "
            "(5.x) ignores it for full_attention layers",
            stacklevel=3,
        )
    extra = tuple(
        (k, hf[k]) for k in sorted(_HF_NO_MATH & set(hf)) if k not in ("num_hidden_layers", "architectures")
    )
    return ModelConfig(
        vocab_size=hf.get("vocab_size", 131072),
        hidden_size=hidden,
        layers=tuple(spec_of[c] for c in pattern),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mtp_layers=tuple(spec_of[c] for c in mtp_pattern) if mtp_depth else (),
        mtp_depth=mtp_depth,
        ssm_cache_dtype=hf.get("mamba_ssm_cache_dtype", "float32"),
        name=hf.get("_name_or_path", ""),
        hf_extra=extra,
    )


def _uniform(cfg: ModelConfig, cls) -> Any:
    """The single spec of `cls` shared by every such layer (HF configs cannot express per-layer specs)."""
    specs = {s for s in cfg.layers + cfg.mtp_layers if isinstance(s, cls)}
    if len(specs) > 1:
        raise ValueError(
            f"to_hf: layers of kind {cls.kind!r} differ ({len(specs)} distinct specs); an HF NemotronH "
            "config can only describe homogeneous layers of each kind"
        )
    return next(iter(specs), None)


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    names = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
    hf: dict[str, Any] = dict(cfg.hf_extra)
    hf.update(
        architectures=["NemotronHForCausalLM"],
        model_type="nemotron_h",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        layers_block_type=[names[s.symbol] for s in cfg.layers],
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        num_nextn_predict_layers=cfg.mtp_depth,
        mamba_ssm_cache_dtype=cfg.ssm_cache_dtype,
        mlp_hidden_act="relu2",
        mamba_hidden_act="silu",
    )
    if cfg.mtp_depth:
        hf["mtp_layers_block_type"] = [names[s.symbol] for s in cfg.mtp_layers]
    m, a, f, e = (_uniform(cfg, c) for c in (MambaSpec, AttentionSpec, MLPSpec, MoESpec))
    if m:
        hf.update(
            mamba_num_heads=m.num_heads, mamba_head_dim=m.head_dim, n_groups=m.n_groups,
            ssm_state_size=m.state_size, conv_kernel=m.conv_kernel, chunk_size=m.chunk_size,
            use_conv_bias=m.conv_bias, use_bias=m.proj_bias, time_step_limit=list(m.dt_limit),
            expand=max(1, m.d_inner // cfg.hidden_size),
        )
        # transformers' chunked path clamps dt from below at time_step_min (not time_step_limit); writing
        # the lower dt limit there makes transformers compute what nemojax computes.
        hf["time_step_min"] = m.dt_limit[0]
    if a:
        hf.update(
            num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
            sliding_window=a.sliding_window, attention_bias=False,
        )
    if f:
        hf.update(intermediate_size=f.intermediate_size, mlp_bias=f.bias)
    if e:
        hf.update(
            n_routed_experts=e.num_experts, num_experts_per_tok=e.top_k, moe_intermediate_size=e.intermediate_size,
            moe_shared_expert_intermediate_size=e.shared_intermediate_size or e.intermediate_size,
            n_shared_experts=1 if e.shared_intermediate_size else 0,
            moe_latent_size=e.latent_size, n_group=e.n_group, topk_group=e.topk_group,
            norm_topk_prob=e.norm_topk_prob, routed_scaling_factor=e.routed_scaling_factor,
        )
        if f and f.bias != e.bias:
            raise ValueError("to_hf: MLP and MoE layers must agree on bias (HF has one mlp_bias)")
        hf.setdefault("mlp_bias", e.bias)
    return hf


# ---------------------------------------------------------------------------------------- presets
def from_pattern(pattern: str, *, vocab_size: int, hidden_size: int, mamba: MambaSpec | None = None,
                 attention: AttentionSpec | None = None, mlp: MLPSpec | None = None, moe: MoESpec | None = None,
                 mtp_pattern: str = "", mtp_depth: int = 0, **kw) -> ModelConfig:
    """A config whose layers follow `pattern` (M, *, -, E), one shared spec per kind."""
    spec_of = {"M": mamba, "*": attention, "-": mlp, "E": moe}
    layers = []
    for i, c in enumerate(pattern + mtp_pattern):
        if c not in spec_of:
            raise ValueError(f"pattern symbol {c!r} at {i} is unknown; allowed: M, *, -, E")
        if spec_of[c] is None:
            raise ValueError(f"pattern uses {c!r} but no {LAYER_KINDS[c].__name__} was given")
        layers.append(spec_of[c])
    return ModelConfig(vocab_size=vocab_size, hidden_size=hidden_size, layers=tuple(layers[: len(pattern)]),
                       mtp_layers=tuple(layers[len(pattern):]), mtp_depth=mtp_depth, **kw)


def _nemotron_h(name, pattern, hidden, mamba_heads, state, ffn, heads, kv_heads=8):
    return from_pattern(
        pattern, vocab_size=131072, hidden_size=hidden, name=name,
        mamba=MambaSpec(num_heads=mamba_heads, head_dim=64, n_groups=8, state_size=state),
        attention=AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=128),
        mlp=MLPSpec(intermediate_size=ffn),
    )


def _build_presets() -> dict[str, ModelConfig]:
    p: dict[str, ModelConfig] = {}
    p["nemotron-h-8b"] = _nemotron_h(
        "nemotron-h-8b", "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-", 4096, 128, 128, 21504, 32)
    p["nemotron-h-56b"] = _nemotron_h(
        "nemotron-h-56b",
        "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-"
        "M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-", 8192, 256, 256, 32768, 64)
    attn_2kv = AttentionSpec(num_heads=32, num_kv_heads=2, head_dim=128)
    p["nemotron-3-nano-30b-a3b"] = from_pattern(
        "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", vocab_size=131072, hidden_size=2688,
        name="nemotron-3-nano-30b-a3b",
        mamba=MambaSpec(num_heads=64, head_dim=64, n_groups=8, state_size=128),
        attention=attn_2kv,
        moe=MoESpec(num_experts=128, top_k=6, intermediate_size=1856, shared_intermediate_size=3712,
                    routed_scaling_factor=2.5),
    )
    p["nemotron-3-super-120b-a12b"] = from_pattern(
        "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME",
        vocab_size=131072, hidden_size=4096, name="nemotron-3-super-120b-a12b",
        mamba=MambaSpec(num_heads=128, head_dim=64, n_groups=8, state_size=128),
        attention=attn_2kv,
        moe=MoESpec(num_experts=512, top_k=22, intermediate_size=2688, shared_intermediate_size=5376,
                    latent_size=1024, routed_scaling_factor=5.0),
        mtp_pattern="*E", mtp_depth=1,
    )
    # Tiny presets: every structural feature of the big ones at test/demo scale.
    tiny_mamba = MambaSpec(num_heads=4, head_dim=16, n_groups=2, state_size=16, chunk_size=16)
    tiny_attn = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16)
    p["tiny-hybrid"] = from_pattern("M-M*-", vocab_size=256, hidden_size=64, name="tiny-hybrid",
                                    mamba=tiny_mamba, attention=tiny_attn, mlp=MLPSpec(128))
    p["tiny-moe"] = from_pattern(
        "MEM*E", vocab_size=256, hidden_size=64, name="tiny-moe", mamba=tiny_mamba, attention=tiny_attn,
        moe=MoESpec(num_experts=8, top_k=2, intermediate_size=32, shared_intermediate_size=64,
                    n_group=2, topk_group=1, routed_scaling_factor=2.5))
    p["tiny-latent-mtp"] = from_pattern(
        "ME*E", vocab_size=256, hidden_size=64, name="tiny-latent-mtp", mamba=tiny_mamba, attention=tiny_attn,
        moe=MoESpec(num_experts=16, top_k=4, intermediate_size=32, shared_intermediate_size=64,
                    latent_size=32, routed_scaling_factor=5.0),
        mtp_pattern="*E", mtp_depth=1)
    return p


PRESETS: dict[str, ModelConfig] = _build_presets()


def get(name: str) -> ModelConfig:
    """A preset by name (see `names()`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def names() -> list[str]:
    return sorted(PRESETS)
