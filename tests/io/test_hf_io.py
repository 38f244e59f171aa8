"""Checkpoint I/O without torch: round trips, the NVIDIA hub layout, and clear errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.flax import load_file, save_file

import nemojax as nj
from nemojax.io.hf import INDEX_NAME, checkpoint_entries
from fixtures.make_golden import to_hub_layout as hub_layout


def saved(tmp_path, name="tiny-latent-mtp"):
    model = nj.HybridLM(nj.presets.get(name), rngs=nnx.Rngs(1))
    nj.save_pretrained(model, tmp_path)
    return model


def tokens():
    return jnp.arange(24, dtype=jnp.int32).reshape(2, 12) * 7 % 256


@pytest.mark.parametrize("name", ["tiny-hybrid", "tiny-moe", "tiny-latent-mtp"])
def test_save_load_round_trip(tmp_path, name):
    model = saved(tmp_path, name)
    loaded = nj.load_pretrained(tmp_path)
    np.testing.assert_array_equal(loaded(tokens()), model(tokens()))
    if model.cfg.mtp_depth:
        np.testing.assert_array_equal(loaded.mtp_logits(tokens())[0], model.mtp_logits(tokens())[0])


def test_saved_names_are_the_transformers_names(tmp_path):
    saved(tmp_path, "tiny-moe")
    names = set(load_file(tmp_path / "model.safetensors"))
    assert {"model.embeddings.weight", "lm_head.weight", "model.layers.0.mixer.conv1d.weight",
            "model.layers.1.mixer.experts.up_proj", "model.layers.1.mixer.gate.e_score_correction_bias",
            "model.layers.1.mixer.shared_experts.down_proj.weight"} <= names
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h" and len(cfg["layers_block_type"]) == 5


def test_bf16_load_casts_parameters_but_keeps_router_bias_fp32(tmp_path):
    saved(tmp_path, "tiny-moe")
    model = nj.load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert model.layers[0].mixer.in_proj.kernel[...].dtype == jnp.bfloat16
    assert model.layers[1].mixer.correction_bias[...].dtype == jnp.float32


def to_hub_layout(src, dst):
    shards, weight_map = hub_layout(load_file(src / "model.safetensors"))
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    for file, part in shards.items():
        save_file(part, dst / file, metadata={"format": "pt"})
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_loads_nvidia_hub_layout(tmp_path):
    model = saved(tmp_path / "hf", "tiny-moe")
    to_hub_layout(tmp_path / "hf", tmp_path / "hub")
    np.testing.assert_array_equal(nj.load_pretrained(tmp_path / "hub")(tokens()), model(tokens()))


def rewrite(tmp_path, edit):
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    saved(tmp_path)
    rewrite(tmp_path, lambda t: t.pop("model.layers.0.mixer.A_log"))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): \['model.layers.0.mixer.A_log'\]"):
        nj.load_pretrained(tmp_path)


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    saved(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.layers.2.mixer.q_proj.weight": jnp.zeros((64, 63))}))
    with pytest.raises(ValueError, match=r"'model.layers.2.mixer.q_proj.weight' has shape \(64, 63\); expected \(64, 64\)"):
        nj.load_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    saved(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.layers.0.mixer.bogus": jnp.zeros(3)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mixer.bogus'"):
        nj.load_pretrained(tmp_path)


def test_checkpoint_entries_cover_every_parameter():
    """Every NNX variable of the model is written by exactly one checkpoint tensor."""
    for name in nj.presets.names():
        cfg = nj.presets.get(name)
        model = nnx.eval_shape(lambda: nj.HybridLM(cfg, rngs=nnx.Rngs(0)))
        paths = {p for p, _ in nnx.to_flat_state(nnx.state(model))}
        entry_paths = [e.path for e in checkpoint_entries(cfg)]
        assert len(entry_paths) == len(set(entry_paths))
        assert set(entry_paths) == paths, name


def hf_only(tmp_path, name="tiny-latent-mtp"):
    """A saved model whose config is HF's config.json alone (as a downloaded checkpoint)."""
    model = saved(tmp_path, name)
    (tmp_path / "nemojax_config.json").unlink()
    return model


def test_config_that_is_not_json_names_the_file(tmp_path):
    hf_only(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "nemotron_h", ')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        nj.load_pretrained(tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path):
    hf_only(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors"):
        nj.load_pretrained(tmp_path)


def test_integer_tensor_is_refused_and_non_finite_is_named(tmp_path):
    hf_only(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.layers.0.mixer.D": jnp.ones(4, jnp.int32)}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mixer.D' has dtype int32; expected a floating"):
        nj.load_pretrained(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.layers.0.mixer.D": jnp.array([1.0, jnp.nan, 1.0, 1.0])}))
    with pytest.warns(UserWarning, match=r"'model.layers.0.mixer.D' holds non-finite values"):
        nj.load_pretrained(tmp_path)
