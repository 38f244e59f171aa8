import json

import pytest

import nemojax as nj
from nemojax.config import MLPSpec, ModelConfig
from testutils import closed_form_counts


# ----------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", nj.presets.names())
def test_param_counts_match_closed_form(name):
    cfg = nj.presets.get(name)
    c = nj.param_counts(cfg)
    # the router correction bias is a buffer (CorrectionBias), not a parameter, as in transformers
    assert (c["total"], c["active"]) == closed_form_counts(cfg)


@pytest.mark.parametrize("name,total,active", [
    ("nemotron-h-8b", 8.1e9, 8.1e9),
    ("nemotron-h-56b", 56e9, 56e9),
    ("nemotron-3-nano-30b-a3b", 31.6e9, 3.6e9),  # NVIDIA: "3.2B active, 3.6B including embeddings"
    ("nemotron-3-super-120b-a12b", 120.6e9, 12.7e9),
])
def test_param_counts_match_published(name, total, active):
    c = nj.param_counts(nj.presets.get(name))
    assert abs(c["total"] / total - 1) < 0.02
    assert abs(c["active"] / active - 1) < 0.02


# ------------------------------------------------------------------------------------ HF mapping
HF_NANO_LIKE = {
    "model_type": "nemotron_h", "vocab_size": 100, "hidden_size": 32,
    "hybrid_override_pattern": "MEM*E-", "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "mamba_num_heads": 4, "mamba_head_dim": 8, "mamba_n_groups": 2, "ssm_state_size": 16, "mamba_d_conv": 3,
    "mamba_chunk_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 24, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
    "intermediate_size": 48, "layer_norm_epsilon": 1e-6, "time_step_limit": [0.0, 5.0], "mlp_bias": True,
}


def test_from_hf_pattern_and_legacy_names():
    cfg = ModelConfig.from_hf(HF_NANO_LIKE)
    assert cfg.pattern == "MEM*E-"
    m, e, a, f = cfg.layers[0], cfg.layers[1], cfg.layers[3], cfg.layers[5]
    assert (m.n_groups, m.conv_kernel, m.chunk_size, m.dt_limit) == (2, 3, 32, (0.0, 5.0))
    assert (e.num_experts, e.top_k, e.shared_intermediate_size, e.n_group, e.routed_scaling_factor, e.bias) == \
        (8, 2, 24, 2, 2.5, True)
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (4, 2, 8)
    assert (f.intermediate_size, f.bias) == (48, True)
    assert cfg.norm_eps == 1e-6


def test_layers_block_type_list_equals_pattern():
    as_list = dict(HF_NANO_LIKE)
    del as_list["hybrid_override_pattern"]
    as_list["layers_block_type"] = ["mamba", "moe", "linear_attention", "full_attention", "moe", "mlp"]
    assert ModelConfig.from_hf(as_list) == ModelConfig.from_hf(HF_NANO_LIKE)


def test_hf_round_trip(tmp_path):
    cfg = ModelConfig.from_hf(HF_NANO_LIKE)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    assert ModelConfig.from_hf(tmp_path) == cfg


def test_mtp_pattern_from_hf():
    hf = dict(HF_NANO_LIKE, num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.mtp_depth, cfg.mtp_pattern) == (1, "*E")


@pytest.mark.parametrize("change,needle", [
    ({"hybrid_override_pattern": "MX*"}, "unknown layer symbols ['X']"),
    ({"layers_block_type": ["mamba", "conv"]}, "unknown block types ['conv']"),
    ({"num_key_value_heads": 3}, "divisible by num_kv_heads=3"),
    ({"mamba_num_heads": 5}, "divisible by n_groups=2"),
    ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act='gelu'"),
    ({"n_routed_experts": 7}, "num_experts=7 must be divisible by n_group=2"),
    ({"num_experts_per_tok": 5}, "top_k=5 exceeds"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "llama"}, "model_type"),
    ({"num_hidden_layers": 5}, "num_hidden_layers=5 disagrees with the 6 layers"),
    ({"use_bias": False, "mamba_proj_bias": True}, "use_bias=False and its legacy alias mamba_proj_bias=True"),
])
def test_bad_hf_config_names_the_field(change, needle):
    with pytest.raises(ValueError) as err:
        ModelConfig.from_hf(dict(HF_NANO_LIKE, **change))
    assert needle in str(err.value)


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match="nemotron-h-8b"):
        nj.presets.get("nemotron-h-9000")


def test_to_hf_rejects_heterogeneous_layers():
    cfg = nj.presets.get("tiny-hybrid")
    layers = list(cfg.layers)
    layers[1] = MLPSpec(intermediate_size=7)
    with pytest.raises(ValueError, match="layers of kind 'mlp' differ"):
        cfg.replace(layers=tuple(layers)).to_hf()


def test_cli_info(capsys):
    from nemojax.cli import main

    assert main(["info", "nemotron-3-super-120b-a12b"]) == 0
    out = capsys.readouterr().out
    assert "MEMEMEM*E" in out and "120.67B" in out and "mtp" in out


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "mamba_num_heads", "num_key_value_heads",
                                   "moe_intermediate_size", "intermediate_size"])
def test_missing_size_is_named_not_defaulted(field):
    """A size that sets the model's shapes has no default: a config without it is named as incomplete
    (it used to take Nemotron-H-8B's value and fail later on a tensor shape)."""
    hf = dict(HF_NANO_LIKE)
    del hf[field]
    with pytest.raises(ValueError, match=rf"config is missing \['{field}'\]"):
        ModelConfig.from_hf(hf)


def test_hf_fields_with_math_are_kept():
    hf = dict(HF_NANO_LIKE, mamba_proj_bias=True, residual_in_fp32=True, initializer_range=0.01,
              num_hidden_layers=6)
    cfg = ModelConfig.from_hf(hf)
    assert cfg.layers[0].proj_bias  # the legacy name of use_bias
    assert cfg.residual_in_fp32 and cfg.init_std == 0.01
    back = cfg.to_hf()
    assert (back["use_bias"], back["residual_in_fp32"], back["initializer_range"]) == (True, True, 0.01)
    assert ModelConfig.from_hf(back) == cfg
