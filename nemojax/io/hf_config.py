"""HF NemotronH `config.json` <-> `ModelConfig`, both directions.

An HF config describes one spec per layer kind, so `to_hf` refuses models whose layers of a kind
differ, or that hold layer kinds NemotronH lacks (no-op, linear); those are saved in the native
format (`ModelConfig.to_json`). A field the config lacks takes transformers' own default, so
nemojax builds what transformers builds; the sizes that have no meaningful default (widths,
head and expert counts of the kinds the model uses) must be present and are named when missing.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from nemojax.config import INF, INIT_STD, AttentionSpec, MambaSpec, MLPSpec, ModelConfig, MoESpec

# HF `layers_block_type` names (new and legacy) -> pattern symbols.
HF_BLOCK_TYPES = {
    "linear_attention": "M", "mamba": "M",
    "full_attention": "*", "attention": "*",
    "mlp": "-",
    "moe": "E",
}
HF_NAMES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}

# HF field -> legacy alias. The legacy names are accepted on input.
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
    "use_bias": "mamba_proj_bias",
}
# Fields that only affect initialisation, caching policy or training-time regularisation.
_HF_NO_MATH = {
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "num_logits_to_keep", "pad_token_id", "bos_token_id", "eos_token_id",
    "max_position_embeddings", "rescale_prenorm_residual",
    "use_mamba_kernels", "time_step_min", "time_step_max", "time_step_floor", "expand",
    "attention_dropout", "hidden_dropout", "output_router_logits", "moe_shared_expert_overlap",
    "num_hidden_layers", "n_shared_experts", "router_aux_loss_coef",
    "output_attentions", "output_hidden_states", "return_dict", "sliding_window_pattern",
    "_name_or_path", "tokenizer_class", "quantization_config", "name_or_path",
}
# Sizes without a meaningful default: required whenever a layer of that kind is present.
_REQUIRED = {
    "": ("vocab_size", "hidden_size"),
    "M": ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups"),
    "*": ("num_attention_heads", "num_key_value_heads", "head_dim"),
    "-": ("intermediate_size",),
    "E": ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
}
_MATH_KEYS = {
    "vocab_size", "hidden_size", "layers_block_type", "hybrid_override_pattern", "num_attention_heads",
    "num_key_value_heads", "head_dim", "sliding_window", "attention_bias", "intermediate_size",
    "mlp_hidden_act", "mlp_bias", "mamba_num_heads", "mamba_head_dim", "mamba_hidden_act", "n_groups",
    "ssm_state_size", "conv_kernel", "chunk_size", "use_conv_bias", "use_bias", "time_step_limit",
    "mamba_ssm_cache_dtype", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
    "moe_shared_expert_intermediate_size", "moe_latent_size", "n_group", "topk_group", "norm_topk_prob",
    "routed_scaling_factor", "num_nextn_predict_layers", "mtp_layers_block_type",
    "mtp_hybrid_override_pattern", "layer_norm_epsilon", "tie_word_embeddings", "initializer_range",
    "residual_in_fp32",
}


def read_hf_config(path) -> dict[str, Any]:
    """The dict of an HF `config.json` (file or checkpoint directory), with the file named in errors."""
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: expected an HF NemotronH config.json")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object; got {type(hf).__name__}")
    return hf


def _pattern_to_symbols(hf: dict[str, Any], list_key: str, pattern_key: str) -> str:
    if hf.get(list_key) is not None:
        types = hf[list_key]
        bad = [t for t in types if t not in HF_BLOCK_TYPES]
        if bad:
            raise ValueError(f"{list_key} has unknown block types {bad}; allowed: {sorted(HF_BLOCK_TYPES)}")
        return "".join(HF_BLOCK_TYPES[t] for t in types)
    pattern = hf.get(pattern_key) or ""
    bad = sorted(set(pattern) - set(HF_NAMES))
    if bad:
        raise ValueError(f"{pattern_key} has unknown layer symbols {bad}; allowed: M (mamba), * (attention), "
                         "- (mlp), E (moe)")
    return pattern


def _as_float(v) -> float:
    """transformers writes non-finite floats into config.json as {"__float__": "Infinity"}."""
    return float(v["__float__"]) if isinstance(v, dict) else float(v)


def from_hf(hf_in: dict[str, Any] | str | Path) -> ModelConfig:
    """Build from an HF NemotronH `config.json` (dict, file, or checkpoint directory)."""
    hf = dict(hf_in) if isinstance(hf_in, dict) else read_hf_config(hf_in)
    for new, old in _HF_LEGACY.items():
        if old in hf:
            if new in hf and hf[new] != hf[old]:
                raise ValueError(f"config has both {new}={hf[new]!r} and its legacy alias {old}={hf[old]!r}, "
                                 "which disagree")
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
    if hf.get("num_hidden_layers") is not None and hf["num_hidden_layers"] != len(pattern):
        raise ValueError(f"num_hidden_layers={hf['num_hidden_layers']} disagrees with the {len(pattern)} layers of "
                         f"the layer pattern {pattern!r}")
    mtp_depth = int(hf.get("num_nextn_predict_layers", 0) or 0)
    mtp_pattern = _pattern_to_symbols(hf, "mtp_layers_block_type", "mtp_hybrid_override_pattern")
    if mtp_depth and not mtp_pattern:
        mtp_pattern = "*E"  # HF default for mtp_layers_block_type
    used = set(pattern + (mtp_pattern if mtp_depth else ""))
    missing = [k for kind in ("", *sorted(used)) for k in _REQUIRED[kind] if k not in hf]
    if "E" in used and hf.get("n_shared_experts", 1) and "moe_shared_expert_intermediate_size" not in hf:
        missing.append("moe_shared_expert_intermediate_size")
    if missing:
        raise ValueError(f"config is missing {missing}: these sizes set the model's shapes and have no default")

    time_step_limit = tuple(_as_float(v) for v in hf.get("time_step_limit", (0.0, INF)))
    spec_of = {
        "M": lambda: MambaSpec(
            num_heads=hf["mamba_num_heads"], head_dim=hf["mamba_head_dim"], n_groups=hf["n_groups"],
            state_size=hf["ssm_state_size"], conv_kernel=hf.get("conv_kernel", 4), chunk_size=hf.get("chunk_size", 128),
            conv_bias=hf.get("use_conv_bias", True), proj_bias=hf.get("use_bias", False), dt_limit=time_step_limit),
        "*": lambda: AttentionSpec(num_heads=hf["num_attention_heads"],
                                   num_kv_heads=hf["num_key_value_heads"] or hf["num_attention_heads"],
                                   head_dim=hf["head_dim"], sliding_window=hf.get("sliding_window")),
        "-": lambda: MLPSpec(intermediate_size=hf["intermediate_size"], bias=hf.get("mlp_bias", False)),
        "E": lambda: MoESpec(
            num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
            intermediate_size=hf["moe_intermediate_size"],
            shared_intermediate_size=hf["moe_shared_expert_intermediate_size"] if hf.get("n_shared_experts", 1) else 0,
            latent_size=hf.get("moe_latent_size"), n_group=hf.get("n_group", 1), topk_group=hf.get("topk_group", 1),
            norm_topk_prob=hf.get("norm_topk_prob", True),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), bias=hf.get("mlp_bias", False)),
    }
    specs = {c: spec_of[c]() for c in used}
    unknown = sorted(set(hf) - _MATH_KEYS - _HF_NO_MATH)
    if unknown:
        warnings.warn(f"config.json fields not understood by nemojax (ignored): {unknown}", stacklevel=3)
    if hf.get("sliding_window") is not None:
        warnings.warn("sliding_window is applied to every attention layer; note that transformers' NemotronH "
                      "(5.x) ignores it for full_attention layers", stacklevel=3)
    extra = tuple((k, hf[k]) for k in sorted(_HF_NO_MATH & set(hf)) if k not in ("num_hidden_layers", "architectures"))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        layers=tuple(specs[c] for c in pattern),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mtp_layers=tuple(specs[c] for c in mtp_pattern) if mtp_depth else (),
        mtp_depth=mtp_depth,
        ssm_cache_dtype=hf.get("mamba_ssm_cache_dtype", "float32"),
        residual_in_fp32=bool(hf.get("residual_in_fp32", False)),
        init_std=float(hf.get("initializer_range", INIT_STD)),
        name=hf.get("_name_or_path", ""),
        hf_extra=extra,
    )


def hf_incompatibility(cfg: ModelConfig) -> str | None:
    """Why an HF NemotronH config cannot describe `cfg`, or None when it can."""
    specs = cfg.layers + cfg.mtp_layers
    odd = sorted({s.kind for s in specs if s.symbol not in HF_NAMES})
    if odd:
        return f"NemotronH has no {' / '.join(odd)} layers"
    for cls in (MambaSpec, AttentionSpec, MLPSpec, MoESpec):
        distinct = {s for s in specs if isinstance(s, cls)}
        if len(distinct) > 1:
            return (f"layers of kind {cls.kind!r} differ ({len(distinct)} distinct specs); an HF NemotronH config "
                    "can only describe homogeneous layers of each kind")
    f = next((s for s in specs if isinstance(s, MLPSpec)), None)
    e = next((s for s in specs if isinstance(s, MoESpec)), None)
    if e and e.segments:
        return "NemotronH routes all of a layer's experts together (MoE routing segments)"
    if f and e and f.bias != e.bias:
        return "MLP and MoE layers must agree on bias (HF has one mlp_bias)"
    return None


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """An HF NemotronH config dict that transformers loads into the same model."""
    why = hf_incompatibility(cfg)
    if why:
        raise ValueError(f"to_hf: {why}; save the native config (ModelConfig.to_json) instead")
    hf: dict[str, Any] = dict(cfg.hf_extra)
    hf.update(
        architectures=["NemotronHForCausalLM"],
        model_type="nemotron_h",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        layers_block_type=[HF_NAMES[s.symbol] for s in cfg.layers],
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        num_nextn_predict_layers=cfg.mtp_depth,
        mamba_ssm_cache_dtype=cfg.ssm_cache_dtype,
        residual_in_fp32=cfg.residual_in_fp32,
        initializer_range=cfg.init_std,
        mlp_hidden_act="relu2",
        mamba_hidden_act="silu",
    )
    if cfg.name:
        hf["_name_or_path"] = cfg.name
    if cfg.mtp_depth:
        hf["mtp_layers_block_type"] = [HF_NAMES[s.symbol] for s in cfg.mtp_layers]
    specs = cfg.layers + cfg.mtp_layers
    m, a, f, e = (next((s for s in specs if isinstance(s, c)), None) for c in (MambaSpec, AttentionSpec, MLPSpec,
                                                                               MoESpec))
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
        hf.update(num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
                  sliding_window=a.sliding_window, attention_bias=False)
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
        hf.setdefault("mlp_bias", e.bias)
    return hf


__all__ = ["HF_BLOCK_TYPES", "from_hf", "hf_incompatibility", "read_hf_config", "to_hf"]
