"""Block-library candidates built from parent layers: kept whole they are the parent layer exactly;
narrowed, pooled or pruned they equal an independent NumPy computation (or the parent with the
removed experts excluded from selection)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax as nj
from nemojax.config import LinearSpec, MambaSpec, MLPSpec, MoESpec
from nemojax.compress.puzzle import library
from nemojax.nn.ffn import MoE
from nemojax.nn.mamba import Mamba2Mixer

jit_call = nnx.jit(lambda m, x: m(x)[0])


def scaled(model, seed=1):
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in
                                                   zip(leaves, keys)]))
    return model


@pytest.fixture(scope="module")
def parent():
    cfg = nj.presets.get("tiny-hybrid").replace_layers({1: MLPSpec(96, bias=True)})  # M-M*-, one biased MLP
    return scaled(nj.HybridLM(cfg, rngs=nnx.Rngs(0)))


def x_of(d=64, seed=5):
    return jax.random.normal(jax.random.key(seed), (2, 9, d))


def test_mlp_narrowed_to_channels_equals_numpy(parent):
    mlp, x = parent.layers[1].mixer, x_of()
    spec, same = library.prune_mlp(mlp, np.arange(96))
    np.testing.assert_array_equal(jit_call(same, x), jit_call(mlp, x))
    keep = np.array([90, 3, 17, 40, 41, 0])
    spec, child = library.prune_mlp(mlp, keep)
    assert spec == MLPSpec(6, bias=True)
    w_up, b_up = np.asarray(mlp.up_proj.kernel[...]), np.asarray(mlp.up_proj.bias[...])
    w_down, b_down = np.asarray(mlp.down_proj.kernel[...]), np.asarray(mlp.down_proj.bias[...])
    k = np.sort(keep)
    ref = np.maximum(np.asarray(x) @ w_up[:, k] + b_up[k], 0) ** 2 @ w_down[k] + b_down
    np.testing.assert_allclose(jit_call(child, x), ref, rtol=1e-5, atol=1e-5)
    h = np.maximum(np.asarray(x).reshape(-1, 64) @ w_up + b_up, 0) ** 2
    np.testing.assert_allclose(library.mlp_channel_contribution(mlp, x),
                               np.abs(h).mean(0) * np.linalg.norm(w_down, axis=1), rtol=1e-5)


def numpy_attention(x, wq, wk, wv, wo, hq, hkv, dh, window=None):
    b, l, _ = x.shape
    q, k, v = (np.asarray(x) @ w for w in (wq, wk, wv))
    q, k, v = q.reshape(b, l, hq, dh), k.reshape(b, l, hkv, dh), v.reshape(b, l, hkv, dh)
    out = np.zeros((b, l, hq, dh))
    for h in range(hq):
        g = h // (hq // hkv)
        s = np.einsum("bid,bjd->bij", q[:, :, h], k[:, :, g]) / np.sqrt(dh)
        i, j = np.arange(l)[:, None], np.arange(l)[None]
        s = np.where((j <= i) & ((i - j < window) if window else True), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, h] = (p / p.sum(-1, keepdims=True)) @ v[:, :, g]
    return out.reshape(b, l, hq * dh) @ wo


def test_kv_heads_pooled_equal_numpy_with_averaged_projections(parent):
    attn, x = parent.layers[3].mixer, x_of()
    spec, same = library.pool_kv_heads(attn, attn.spec.num_kv_heads)
    np.testing.assert_array_equal(jit_call(same, x), jit_call(attn, x))
    spec, child = library.pool_kv_heads(attn, 1)
    assert spec.num_kv_heads == 1 and spec.num_heads == attn.spec.num_heads
    s = attn.spec
    wk = np.asarray(attn.k_proj.kernel[...]).reshape(64, s.num_kv_heads, s.head_dim).mean(1)
    wv = np.asarray(attn.v_proj.kernel[...]).reshape(64, s.num_kv_heads, s.head_dim).mean(1)
    ref = numpy_attention(x, np.asarray(attn.q_proj.kernel[...]), wk, wv, np.asarray(attn.o_proj.kernel[...]),
                          s.num_heads, 1, s.head_dim)
    np.testing.assert_allclose(jit_call(child, x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="positive divisor of the parent's 2"):
        library.pool_kv_heads(attn, 3)


def test_kept_experts_route_as_the_parent_with_the_others_excluded():
    spec = MoESpec(num_experts=8, top_k=2, intermediate_size=16, shared_intermediate_size=24, latent_size=32,
                   routed_scaling_factor=2.0)
    moe = scaled(MoE(spec, 64, std=0.02, out_std=0.02, dtype=jnp.float32, rngs=nnx.Rngs(3)))
    x = x_of()
    _, same = library.keep_experts(moe, np.arange(8))
    np.testing.assert_array_equal(jit_call(same, x), jit_call(moe, x))
    keep = np.array([6, 1, 3, 4])
    child_spec, child = library.keep_experts(moe, keep)
    assert (child_spec.num_experts, child_spec.top_k) == (4, 2)
    excluded = nnx.clone(moe)  # the parent, removed experts never selected
    bias = np.asarray(moe.correction_bias[...]).copy()
    bias[np.setdiff1d(np.arange(8), keep)] = -1e9
    excluded.correction_bias[...] = jnp.asarray(bias)
    np.testing.assert_allclose(jit_call(child, x), jit_call(excluded, x), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(jit_call(child, x) - jit_call(moe, x)))) > 1e-3  # the pruning mattered
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 8\)"):
        library.keep_experts(moe, [1, 1])


def test_a_child_of_whole_candidates_gives_the_parent_logits_exactly(parent):
    t = jax.random.randint(jax.random.key(2), (2, 12), 0, 256)
    child = parent.replace_layers({1: library.prune_mlp(parent.layers[1].mixer, np.arange(96)),
                                   3: library.pool_kv_heads(parent.layers[3].mixer, 2)})
    logits = nnx.jit(lambda m, t: m(t))
    np.testing.assert_array_equal(logits(child, t), logits(parent, t))
    narrow = parent.replace_layers({1: library.prune_mlp(parent.layers[1].mixer, np.arange(48)),
                                    3: library.pool_kv_heads(parent.layers[3].mixer, 1)})
    assert narrow.cfg.layers[1] == MLPSpec(48, bias=True) and narrow.cfg.layers[3].num_kv_heads == 1
    assert nj.param_counts(narrow.cfg)["total"] < nj.param_counts(parent.cfg)["total"]


def test_fit_linear_recovers_a_linear_layer_and_leaves_an_orthogonal_residual(parent):
    x = jax.random.normal(jax.random.key(8), (4, 40, 64))  # 160 tokens for 65 unknowns per output
    linear = parent.replace_layers({2: (LinearSpec(bias=True), None)}, rngs=nnx.Rngs(9)).layers[2]
    spec, fitted = library.fit_linear(linear, x)
    assert spec == LinearSpec(bias=True)
    np.testing.assert_allclose(fitted.linear.kernel[...], linear.mixer.linear.kernel[...], atol=1e-4)
    np.testing.assert_allclose(fitted.linear.bias[...], linear.mixer.linear.bias[...], atol=1e-4)
    block = parent.layers[1]  # a biased MLP: the residual of the fit is orthogonal to the inputs and to 1
    _, fit = library.fit_linear(block, x)
    h = np.asarray(block.norm(x), np.float64).reshape(-1, 64)
    targets = np.asarray(block(x)[0] - x, np.float64).reshape(-1, 64)
    residual = np.asarray(jit_call(fit, block.norm(x)), np.float64).reshape(-1, 64) - targets
    assert np.max(np.abs(h.T @ residual)) < 1e-4 * np.max(np.abs(h.T @ targets))
    assert np.max(np.abs(residual.sum(0))) < 1e-4 * np.max(np.abs(targets.sum(0)))


def test_sliding_window_equals_numpy_with_a_band_mask(parent):
    attn, x = parent.layers[3].mixer, x_of()  # 9 tokens
    _, wide = library.sliding_window(attn, 9)
    np.testing.assert_allclose(jit_call(wide, x), jit_call(attn, x), rtol=1e-6, atol=1e-7)
    spec, child = library.sliding_window(attn, 3)
    assert spec.sliding_window == 3 and child.spec == spec and attn.spec.sliding_window is None
    s = attn.spec
    w = [np.asarray(getattr(attn, n).kernel[...]) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    ref = numpy_attention(x, *w, s.num_heads, s.num_kv_heads, s.head_dim, window=3)
    np.testing.assert_allclose(jit_call(child, x), ref, rtol=1e-4, atol=1e-5)
    assert np.max(np.abs(np.asarray(jit_call(child, x)) - np.asarray(jit_call(attn, x)))) > 1e-3
    with pytest.raises(ValueError, match="window must be a positive int"):
        library.sliding_window(attn, 0)


@pytest.mark.parametrize("proj_bias", [False, True])
def test_mamba_heads_kept_equal_the_parent_with_the_others_silenced(proj_bias):
    spec = MambaSpec(num_heads=4, head_dim=8, n_groups=4, state_size=8, chunk_size=4, proj_bias=proj_bias)
    mamba = scaled(Mamba2Mixer(spec, 32, eps=1e-5, std=0.1, out_std=0.1, dtype=jnp.float32, rngs=nnx.Rngs(6)))
    x = jax.random.normal(jax.random.key(3), (2, 11, 32))
    _, same = library.prune_mamba_heads(mamba, np.arange(4))
    np.testing.assert_array_equal(jit_call(same, x), jit_call(mamba, x))
    child_spec, child = library.prune_mamba_heads(mamba, [3, 1])
    assert (child_spec.num_heads, child_spec.n_groups, child_spec.d_inner) == (2, 2, 16)
    silenced = nnx.clone(mamba)  # one head per norm group: dropping heads = zeroing their output rows
    rows = np.concatenate([np.arange(h * 8, h * 8 + 8) for h in (0, 2)])
    silenced.out_proj.kernel[...] = mamba.out_proj.kernel[...].at[rows].set(0.0)
    np.testing.assert_allclose(jit_call(child, x), jit_call(silenced, x), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(jit_call(child, x) - jit_call(mamba, x)))) > 1e-3
    grouped = Mamba2Mixer(dataclasses.replace(spec, n_groups=2), 32, eps=1e-5, std=0.1, out_std=0.1,
                          dtype=jnp.float32, rngs=nnx.Rngs(6))
    with pytest.raises(ValueError, match=r"same number of heads from each of the 2 groups .* \[2, 1\]"):
        library.prune_mamba_heads(grouped, [0, 1, 2])


def test_mamba_head_contribution_is_what_silencing_the_head_takes_from_the_output():
    spec = MambaSpec(num_heads=4, head_dim=8, n_groups=2, state_size=8, chunk_size=4)
    mamba = scaled(Mamba2Mixer(spec, 32, eps=1e-5, std=0.1, out_std=0.1, dtype=jnp.float32, rngs=nnx.Rngs(2)))
    x = jax.random.normal(jax.random.key(4), (2, 11, 32))
    full = np.asarray(jit_call(mamba, x), np.float64).reshape(-1, 32)
    lost = []
    for h in range(4):
        silenced = nnx.clone(mamba)
        silenced.out_proj.kernel[...] = mamba.out_proj.kernel[...].at[h * 8:(h + 1) * 8].set(0.0)
        out = np.asarray(jit_call(silenced, x), np.float64).reshape(-1, 32)
        lost.append(np.linalg.norm(full - out, axis=1).mean())
    got = library.mamba_head_contribution(mamba, x)
    np.testing.assert_allclose(got, lost, rtol=1e-4)
    assert np.ptp(got) > 0.1 * np.max(got)  # the heads differ, so the ranking is not arbitrary


@pytest.mark.parametrize("num_heads,n_groups", [(8, 4), (12, 3), (6, 1), (4, 4)])
def test_mamba_keep_heads_is_the_best_set_that_prune_accepts(num_heads, n_groups):
    import itertools

    spec = MambaSpec(num_heads=num_heads, head_dim=4, n_groups=n_groups, state_size=4)
    c = np.random.default_rng(num_heads + n_groups).exponential(size=num_heads)
    per_group = num_heads // n_groups
    for n in range(1, num_heads + 1):
        best = None
        for subset in itertools.combinations(range(num_heads), n):
            counts = np.bincount(np.array(subset) // per_group, minlength=n_groups)
            if len(set(counts[counts > 0].tolist())) == 1 and (best is None or c[list(subset)].sum() > best):
                best = c[list(subset)].sum()
        keep = library.mamba_keep_heads(c, spec, n)
        if best is None:
            assert keep is None
        else:
            assert len(keep) == n
            np.testing.assert_allclose(c[keep].sum(), best, rtol=1e-12)
    with pytest.raises(ValueError, match="1 <= n <= 4"):
        library.mamba_keep_heads(np.ones(4), MambaSpec(num_heads=4, head_dim=4, n_groups=2, state_size=4), 0)


def test_attention_as_linear_equals_attention_attending_only_to_itself(parent):
    attn, x = parent.layers[3].mixer, x_of()  # 4 query heads over 2 KV heads
    spec, linear = library.attention_as_linear(attn)
    assert spec == LinearSpec(bias=False)
    _, itself = library.sliding_window(attn, 1)
    np.testing.assert_allclose(jit_call(linear, x), jit_call(itself, x), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(jit_call(linear, x)) - np.asarray(jit_call(attn, x)))) > 1e-3
