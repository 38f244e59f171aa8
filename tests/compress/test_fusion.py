"""`fusion.fuse` and `fusion.parallelize` against the formulas they implement, computed from the
original layers' weights: x + sum_t FFN_t(norm(x)) with the last FFN's norm weight ("last") or each
FFN's own ("fold"); MoE runs equal the sum of the original MoE layers; parallel layers equal the
sum of the original blocks' contributions. Fused models save, load and count their parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax as nj
from nemojax.compress import fusion
from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, ModelConfig, MoESpec, NoOpSpec
from testutils import closed_form_counts

D = 24
EPS = 1e-5
LAYERS = (
    MambaSpec(num_heads=2, head_dim=8, n_groups=1, state_size=4, chunk_size=4),  # 0
    MLPSpec(32, bias=True),  # 1
    NoOpSpec(),  # 2
    MLPSpec(16),  # 3
    MLPSpec(40, bias=True),  # 4
    AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=8),  # 5
    MoESpec(num_experts=4, top_k=2, intermediate_size=8, shared_intermediate_size=12),  # 6
    MoESpec(num_experts=6, top_k=1, intermediate_size=8),  # 7
    MoESpec(num_experts=4, top_k=3, intermediate_size=8, shared_intermediate_size=8),  # 8
    MLPSpec(20),  # 9
    MoESpec(num_experts=4, top_k=2, intermediate_size=8, latent_size=12),  # 10
)
CFG = ModelConfig(vocab_size=64, hidden_size=D, layers=LAYERS, norm_eps=EPS)


@pytest.fixture(scope="module")
def model():
    """Random norm weights (so "last" and "fold" differ) and weights large enough to route decisively."""
    m = nj.HybridLM(CFG, rngs=nnx.Rngs(0))
    leaves, treedef = jax.tree.flatten(nnx.state(m, nnx.Param))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(m, jax.tree.unflatten(treedef, [x + (0.2 if x.ndim >= 2 else 0.5) * jax.random.normal(k, x.shape)
                                               for x, k in zip(leaves, keys)]))
    return m


def x_in(seed=2):
    return jax.random.normal(jax.random.key(seed), (2, 7, D))


def np_norm(x, w):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * np.asarray(w, np.float64)


def np_mlp(mlp, h):
    """relu(h W_up + b_up)^2 W_down + b_down in float64 from the layer's weights."""
    up = h @ np.asarray(mlp.up_proj.kernel[...], np.float64)
    if mlp.up_proj.bias is not None:
        up = up + np.asarray(mlp.up_proj.bias[...], np.float64)
    y = np.maximum(up, 0) ** 2 @ np.asarray(mlp.down_proj.kernel[...], np.float64)
    return y if mlp.down_proj.bias is None else y + np.asarray(mlp.down_proj.bias[...], np.float64)


def run_norm(model, layers, norm, t):
    return model.layers[layers[-1] if norm == "last" else t].norm.weight[...]


@pytest.mark.parametrize("norm", ["last", "fold"])
def test_mlp_run_is_the_sum_of_its_ffns_on_one_input(model, norm):
    x = x_in()
    fused = fusion.fuse(model, 1, 5, norm=norm)  # MLPs 1, 3, 4 with a no-op between
    assert fused.cfg.layers[1] == MLPSpec(32 + 16 + 40, bias=True)
    assert fused.cfg.layers[2:5] == (NoOpSpec(),) * 3 and fused.cfg.layers[5:] == LAYERS[5:]
    ref = np.asarray(x, np.float64) + sum(np_mlp(model.layers[t].mixer, np_norm(x, run_norm(model, [1, 3, 4], norm, t)))
                                          for t in (1, 3, 4))
    got = fused.layers[1](x)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    contribution = fused.layers[1].contribution(x)[0]
    assert np.max(np.abs(contribution - (ref - np.asarray(x)))) <= 1e-5 * np.max(np.abs(ref - np.asarray(x)))
    assert model.cfg == CFG  # the model passed in is untouched


def test_last_and_fold_differ_when_the_norm_weights_do(model):
    x = x_in()
    a, b = (fusion.fuse(model, 1, 5, norm=n).layers[1].contribution(x)[0] for n in ("last", "fold"))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-2 * float(jnp.max(jnp.abs(a)))


@pytest.mark.parametrize("norm", ["last", "fold"])
def test_moe_run_routes_each_layer_among_its_own_experts(model, norm):
    x = x_in(3)
    fused = fusion.fuse(model, 6, 9, norm=norm)
    spec = fused.cfg.layers[6]
    assert spec.segments == ((4, 2), (6, 1), (4, 3)) and (spec.num_experts, spec.top_k) == (14, 6)
    assert spec.shared_intermediate_size == 20
    ref = sum(model.layers[t].mixer(jnp.asarray(np_norm(x, run_norm(model, [6, 7, 8], norm, t)), jnp.float32))[0]
              for t in (6, 7, 8))
    got = fused.layers[6].contribution(x)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    if norm == "fold":  # fusing a fused layer with the next FFN composes: its segments come first
        twice = fusion.fuse(fusion.fuse(model, 6, 8, norm=norm), 6, 9, norm=norm)
        assert twice.cfg.layers[6] == spec
        np.testing.assert_allclose(twice.layers[6].contribution(x)[0], got, rtol=1e-5, atol=1e-6)


def test_mixed_run_is_a_parallel_layer_of_one_wide_mlp_and_one_moe(model):
    x = x_in(4)
    fused = fusion.fuse(model, 8, 10, norm="fold")
    spec = fused.cfg.layers[8]
    assert spec.kind == "parallel" and [b.kind for b in spec.branches] == ["mlp", "moe"]
    ref = (np_mlp(model.layers[9].mixer, np_norm(x, model.layers[9].norm.weight[...]))
           + np.asarray(model.layers[8].mixer(jnp.asarray(np_norm(x, model.layers[8].norm.weight[...]),
                                                          jnp.float32))[0], np.float64))
    np.testing.assert_allclose(fused.layers[8].contribution(x)[0], ref, rtol=1e-5, atol=1e-5)


def test_fused_model_counts_saves_loads_and_decodes(model, tmp_path):
    fused = fusion.fuse(fusion.fuse(model, 6, 10, norm="last"), 1, 5, norm="fold")
    assert fused.cfg.pattern == "M-...*P...E"
    counts = nj.param_counts(fused.cfg)
    before = nj.param_counts(CFG)
    # weights are concatenated, never dropped. Merged: the runs' pre-norms (3 MLPs -> 1 norm; 3 MoEs + 1
    # MLP -> 2 branch norms) and the down-projection biases of MLPs 1 and 4 (summed); added: a zero up-bias
    # for MLP 3 (16 channels), which had none
    assert counts["total"] == before["total"] - (2 + 2) * D - D + 16
    assert (counts["total"], counts["active"]) == closed_form_counts(fused.cfg)
    t = jax.random.randint(jax.random.key(5), (2, 9), 0, CFG.vocab_size)
    nj.save_pretrained(fused, tmp_path)
    back = nj.load_pretrained(tmp_path)
    assert back.cfg == fused.cfg
    np.testing.assert_array_equal(back(t), fused(t))
    forward = nnx.jit(lambda m, x, c: m.forward(x, c))
    cache = fused.init_cache(2, 9)
    pieces = []
    logits, cache = forward(fused, t[:, :5], cache)
    pieces.append(logits)
    for i in range(5, 9):
        logits, cache = forward(fused, t[:, i:i + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), fused(t), rtol=2e-5, atol=2e-5)


def test_parallelize_sums_the_original_blocks_on_one_input(model):
    x = x_in(6)
    par = fusion.parallelize(model, 3, 7)  # MLP, MLP, attention, MoE
    assert par.cfg.layers[3].branches == LAYERS[3:7] and par.cfg.layers[4:7] == (NoOpSpec(),) * 3
    ref = sum(model.layers[t].contribution(x)[0] for t in range(3, 7))
    np.testing.assert_allclose(par.layers[3].contribution(x)[0], ref, rtol=1e-5, atol=1e-6)


def test_fused_mlp_keeps_the_kernel_choice(model):
    chosen = nnx.clone(model)
    nj.configure_kernels(chosen, ffn="xla")
    assert fusion.fuse(chosen, 1, 5).layers[1].mixer.implementation == "xla"


@pytest.mark.parametrize("args,needle", [
    ((0, 3), "fuse: layer 0 is a mamba layer"),
    ((4, 7), "fuse: layer 5 is a attention layer"),
    ((9, 11), "fuse: layer 10 is a LatentMoE layer"),
    ((2, 4), "hold 1 FFN layer(s)"),
    ((3, 3), "need 0 <= start < stop <= 11"),
    ((1, 12), "need 0 <= start < stop <= 11"),
    ((1.0, 3), "start must be an int"),
])
def test_fuse_rejects_what_it_cannot_fuse_naming_the_layer(model, args, needle):
    with pytest.raises(ValueError) as err:
        fusion.fuse(model, *args)
    assert needle in str(err.value)


def test_fuse_rejects_moe_layers_that_cannot_share_a_router(model):
    other = model.replace_layers({7: (MoESpec(num_experts=6, top_k=1, intermediate_size=8, norm_topk_prob=False),
                                      None)})
    with pytest.raises(ValueError, match="differ in norm_topk_prob"):
        fusion.fuse(other, 6, 8)
    with pytest.raises(ValueError, match="norm must be one of"):
        fusion.fuse(model, 1, 5, norm="first")
