"""FP8 KV cache (`kv_cache_dtype="fp8" | "fp8_uncalibrated"`) and its calibration, against a NumPy E4M3
rounding written from the format's bits (`quant_reference`), K and V recomputed in NumPy from the
layer inputs, and a model whose K and V projections are explicitly quantised and dequantised through
that NumPy rounding (a plain cache then holds exactly what an FP8 cache decodes to)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from quant_reference import E4M3, round_nearest_even
from safetensors import safe_open

import nemojax as nj
from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, ModelConfig, ParallelSpec, from_pattern
from nemojax.nn.attention import kv_cache_layers, layer_cache
from nemojax.quant.kv_cache import calibrate_kv_scales, kv_scales, set_kv_scales
from nemojax.speculative import speculative_generate

D, VOCAB = 32, 64
# the second attention layer is a branch of a parallel layer (its cache nests one level deeper) with a window
CFG = ModelConfig(vocab_size=VOCAB, hidden_size=D, name="kv-cache-test", layers=(
    MambaSpec(num_heads=2, head_dim=16, n_groups=1, state_size=8, chunk_size=8),
    AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16),
    MLPSpec(64),
    ParallelSpec((AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=16, sliding_window=6), MLPSpec(32))),
))
ATTENTION = {"layers.1.mixer": (1,), "layers.3.mixer.branches.0.mixer": (3, 0)}


def unit_gain_model(dtype=jnp.float32, seed=0):
    """Kernels ~ N(0, 1/fan_in) so that K and V are O(1) (amax a few units: they fit E4M3 at scale 1,
    mostly above its subnormals) and every layer moves the logits."""
    model = nj.HybridLM(CFG, rngs=nnx.Rngs(seed), dtype=dtype)
    rng = np.random.default_rng(seed)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        shape = var.get_value().shape
        if path[-1] == "kernel" or path[0] == "embeddings":
            var.set_value(jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0] if len(path) > 1 else 1), dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def tokens(b=2, length=11, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, length), 0, VOCAB, jnp.int32)


def e4m3_qdq(x, scale: float):
    """NumPy: round_E4M3(x * (1/scale)) * scale in fp32, the reciprocal and products in fp32 as encode_fp8."""
    x = np.asarray(x, np.float32)
    inv = np.float32(1) / np.float32(scale)
    return (round_nearest_even((x * inv).astype(np.float32), E4M3).astype(np.float32) * np.float32(scale)) \
        .astype(np.float32)


class QuantisedProjection(nnx.Module):
    """A K or V projection whose output goes through `e4m3_qdq` (NumPy, via a host callback)."""

    def __init__(self, linear, scale: float):
        self.linear, self.scale = linear, scale

    def __call__(self, x):
        y = self.linear(x)
        shape = jax.ShapeDtypeStruct(y.shape, jnp.float32)
        return jax.pure_callback(lambda a: e4m3_qdq(a, self.scale), shape, y.astype(jnp.float32)).astype(y.dtype)


def explicitly_quantised(model, scales):
    """A copy of `model` whose attention K and V are quantised and dequantised by `scales` ({layer: (k, v)})."""
    copy = nnx.merge(*nnx.split(model))
    for name, (_, m) in kv_cache_layers(copy).items():
        m.k_proj = QuantisedProjection(m.k_proj, scales[name][0])
        m.v_proj = QuantisedProjection(m.v_proj, scales[name][1])
    return copy


@nnx.jit(static_argnames="kv_cache_dtype")
def prefill(model, toks, kv_cache_dtype=None):
    return model.forward(toks, model.init_cache(toks.shape[0], toks.shape[1] + 3, kv_cache_dtype=kv_cache_dtype))


def decoded(cache, t):
    """The K or V ("k"/"v") an attention layer's cache holds, as fp32 NumPy."""
    codes = np.asarray(cache[t].astype(jnp.float32))
    return codes * np.float32(cache[f"{t}_scale"]) if f"{t}_scale" in cache else codes


def test_kv_cache_layers_name_every_attention_layer_and_its_cache():
    model = unit_gain_model()
    assert {name: index for name, (index, _) in kv_cache_layers(model).items()} == ATTENTION
    cache = model.init_cache(2, 5)
    for index in ATTENTION.values():
        assert layer_cache(cache["layers"], index)["k"].shape[2] == 5


def test_unit_scale_fp8_cache_equals_the_plain_cache_to_e4m3_precision():
    """Scale 1: the first attention layer's codes are NumPy's E4M3 rounding of the plain cache's K and V
    bit for bit (within half an E4M3 step of them); deeper layers read a residual stream already changed
    by the first one's rounding, so the whole cache is held to the explicitly quantised model's."""
    model, toks = unit_gain_model(), tokens()
    _, plain = prefill(model, toks)
    logits8, fp8 = prefill(model, toks, "fp8_uncalibrated")
    first = ATTENTION["layers.1.mixer"]
    for t in ("k", "v"):
        exact = np.asarray(layer_cache(plain["layers"], first)[t])
        c = layer_cache(fp8["layers"], first)
        assert c[t].dtype == jnp.float8_e4m3fn and float(c[f"{t}_scale"]) == 1.0
        assert 1 < np.max(np.abs(exact)) < 448  # values that fit
        got = decoded(c, t)
        np.testing.assert_array_equal(got, e4m3_qdq(exact, 1.0))
        assert np.all(np.abs(got - exact) <= 2.0 ** -4 * np.abs(exact) + 2.0 ** -10)  # half a step (normal, subnormal)
        assert np.mean(got != exact) > 0.5  # the rounding really happened
    ref_logits, ref = prefill(explicitly_quantised(model, {n: (1.0, 1.0) for n in ATTENTION}), toks)
    for index in ATTENTION.values():
        for t in ("k", "v"):
            np.testing.assert_allclose(decoded(layer_cache(fp8["layers"], index), t),
                                       np.asarray(layer_cache(ref["layers"], index)[t]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits8, ref_logits, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(logits8 - prefill(model, toks)[0]))) > 1e-4  # and it differs from the plain cache


def test_calibrated_scales_are_amax_over_448_of_the_attention_inputs_projected_in_numpy():
    model = unit_gain_model()
    batches = [tokens(seed=2), tokens(seed=3)]
    scales = calibrate_kv_scales(model, batches)
    assert set(scales) == set(ATTENTION)
    amax = {name: np.zeros(2) for name in ATTENTION}
    for toks in batches:
        states = [np.asarray(s, np.float64) for s in model.layer_states(toks)]
        blocks = {"layers.1.mixer": (model.layers[1], states[1]),
                  "layers.3.mixer.branches.0.mixer": (model.layers[3].mixer.branches[0], states[3])}
        for name, (block, x) in blocks.items():
            h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + CFG.norm_eps) * np.asarray(block.norm.weight[...])
            for j, proj in enumerate((block.mixer.k_proj, block.mixer.v_proj)):
                amax[name][j] = max(amax[name][j], np.max(np.abs(h @ np.asarray(proj.kernel[...], np.float64))))
    for name in ATTENTION:
        np.testing.assert_allclose(scales[name], amax[name] / 448, rtol=1e-5)
    set_kv_scales(model, scales)
    assert kv_scales(model) == scales
    cache = model.init_cache(1, 4, kv_cache_dtype="fp8")
    for name, index in ATTENTION.items():
        c = layer_cache(cache["layers"], index)
        assert (float(c["k_scale"]), float(c["v_scale"])) == pytest.approx(scales[name], rel=1e-7)


@pytest.mark.parametrize("dtype,ratio", [(jnp.float32, 4), (jnp.bfloat16, 2)])
def test_the_fp8_cache_is_float8_and_its_attention_bytes_shrink(dtype, ratio):
    model = unit_gain_model(dtype)
    plain, fp8 = model.init_cache(3, 40), model.init_cache(3, 40, kv_cache_dtype="fp8_uncalibrated")
    for index in ATTENTION.values():
        p, q = layer_cache(plain["layers"], index), layer_cache(fp8["layers"], index)
        assert p["k"].dtype == dtype and q["k"].dtype == q["v"].dtype == jnp.float8_e4m3fn
        kv_bytes = sum(q[t].nbytes for t in ("k", "v"))
        assert kv_bytes * ratio == sum(p[t].nbytes for t in ("k", "v"))
        assert sum(x.nbytes for x in jax.tree.leaves(q)) == kv_bytes + 8  # and two fp32 scales
    # the Mamba layer's states are untouched
    assert jax.tree.map(lambda x: (x.shape, x.dtype), plain["layers"][0]) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), fp8["layers"][0])
    as_bf16 = model.init_cache(3, 40, kv_cache_dtype="bfloat16")
    assert layer_cache(as_bf16["layers"], (1,))["k"].dtype == jnp.bfloat16


def test_greedy_generation_with_the_fp8_cache_equals_the_explicitly_quantised_model():
    """Prefill and every decode step read K and V through the calibrated scales: token for token the
    output of a model that rounds K and V itself (NumPy) and caches them in fp32."""
    model, prompt = unit_gain_model(), tokens(b=3, length=9, seed=4)
    scales = calibrate_kv_scales(model, [tokens(b=4, length=16, seed=5)])
    set_kv_scales(model, scales)
    out = nj.generate(model, prompt, 12, kv_cache_dtype="fp8")
    ref = nj.generate(explicitly_quantised(model, scales), prompt, 12)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(nj.generate(model, prompt, 12, kv_cache_dtype="fp8_uncalibrated"),
                                  nj.generate(explicitly_quantised(model, {n: (1.0, 1.0) for n in ATTENTION}),
                                              prompt, 12))


def test_speculative_decoding_caches_the_main_model_in_fp8_and_keeps_its_greedy_output():
    cfg = from_pattern("M*-", vocab_size=VOCAB, hidden_size=D, mamba=CFG.layers[0], attention=CFG.layers[1],
                       mlp=CFG.layers[2], mtp_pattern="*-", mtp_depth=1)
    model, prompt = nj.HybridLM(cfg, rngs=nnx.Rngs(0)), tokens(length=6)
    plain = nj.generate(model, prompt, 10, kv_cache_dtype="fp8_uncalibrated")
    np.testing.assert_array_equal(nj.generate(model, prompt, 10, draft="mtp", num_draft=2,
                                              kv_cache_dtype="fp8_uncalibrated"), plain)
    graphdef, state = nnx.split(model)  # the call generate made: its compiled loop is reused
    *_, cache, mtp_caches = speculative_generate(graphdef, state, prompt, jax.random.key(0), max_new_tokens=10,
                                                 num_draft=2, temperature=0.0, top_k=None, top_p=None,
                                                 kv_cache_dtype="fp8_uncalibrated")
    assert cache["layers"][1]["k"].dtype == jnp.float8_e4m3fn and float(cache["layers"][1]["k_scale"]) == 1.0
    assert mtp_caches[0][0]["k"].dtype == jnp.float32  # the drafter's own cache stays in the model's dtype


def test_save_load_round_trips_the_scales_under_hf_names(tmp_path):
    model = unit_gain_model()
    nj.save_pretrained(model, tmp_path / "plain")
    with safe_open(tmp_path / "plain" / "model.safetensors", framework="numpy") as f:
        assert not [k for k in f.keys() if k.endswith("_scale")]
    assert kv_scales(nj.load_pretrained(tmp_path / "plain")) == {}
    scales = {"layers.1.mixer": (0.375, 0.5), "layers.3.mixer.branches.0.mixer": (3.0, 0.25)}
    set_kv_scales(model, scales)
    nj.save_pretrained(model, tmp_path / "calibrated")
    with safe_open(tmp_path / "calibrated" / "model.safetensors", framework="numpy") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if k.endswith("_scale")}
    assert {k: (v.shape, v.dtype.name, float(v)) for k, v in stored.items()} == {
        "model.layers.1.mixer.k_scale": ((), "float32", 0.375), "model.layers.1.mixer.v_scale": ((), "float32", 0.5),
        "model.layers.3.mixer.branches.0.mixer.k_scale": ((), "float32", 3.0),
        "model.layers.3.mixer.branches.0.mixer.v_scale": ((), "float32", 0.25)}
    loaded = nj.load_pretrained(tmp_path / "calibrated", dtype=jnp.bfloat16)
    assert kv_scales(loaded) == scales
    assert layer_cache(loaded.init_cache(1, 2, kv_cache_dtype="fp8")["layers"], (1,))["k_scale"].dtype == jnp.float32


def test_a_checkpoint_with_half_a_pair_or_a_stray_scale_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = unit_gain_model()
    set_kv_scales(model, {"layers.1.mixer": (0.5, 0.5)})
    nj.save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mixer.v_scale"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"pairs.*layers\.1\.mixer.*v_scale"):
        nj.load_pretrained(tmp_path)
    tensors["model.layers.2.mixer.k_scale"] = np.array(1.0, np.float32)  # layer 2 is an MLP
    tensors["model.layers.1.mixer.v_scale"] = np.array(1.0, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.2\.mixer\.k_scale'"):
        nj.load_pretrained(tmp_path)


@pytest.mark.parametrize("call,needle", [
    (lambda m: nj.generate(m, tokens(), 2, kv_cache_dtype="e4m3"),
     r"kv_cache_dtype must be one of \(None, 'float32', 'bfloat16', 'float16', 'fp8', 'fp8_uncalibrated'\)"),
    (lambda m: m.init_cache(1, 4, kv_cache_dtype="int8"), "kv_cache_dtype must be one of"),
    (lambda m: nj.generate(m, tokens(), 2, kv_cache_dtype="fp8"),
     r"layer\(s\) \['layers\.1\.mixer', 'layers\.3\.mixer\.branches\.0\.mixer'\] have none: calibrate them with "
     r"nemojax\.quant\.kv_cache\.calibrate_kv_scales"),
    (lambda m: set_kv_scales(m, {"layers.2.mixer": (1.0, 1.0)}),
     r"not attention layers of this model.*layers\.1\.mixer"),
    (lambda m: set_kv_scales(m, {"layers.1.mixer": (0.0, 1.0)}), r"both finite and > 0"),
    (lambda m: calibrate_kv_scales(m, []), "batches is empty"),
])
def test_bad_kv_cache_requests_name_the_field_and_the_allowed_values(call, needle):
    with pytest.raises(ValueError, match=needle):
        call(unit_gain_model())


def test_fp8_needs_every_attention_layer_calibrated():
    model = unit_gain_model()
    set_kv_scales(model, {"layers.1.mixer": (0.5, 0.5)})
    with pytest.raises(ValueError, match=r"\['layers\.3\.mixer\.branches\.0\.mixer'\] have none"):
        model.init_cache(1, 4, kv_cache_dtype="fp8")
