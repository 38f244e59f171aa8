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
from nemojax.config import AttentionSpec, LinearSpec, MambaSpec, MLPSpec, MoESpec, NoOpSpec, from_pattern
from nemojax.compress import experts
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


# ------------------------------------------------------------------------------------------------ the table
@pytest.fixture(scope="module")
def table():
    """A parent with one layer of each kind (Mamba heads in 2 groups, attention with 4 KV heads, an MoE
    with a shared expert), its calibration tokens, per-layer inputs and default library."""
    cfg = from_pattern("M-*E", vocab_size=64, hidden_size=32, mlp=MLPSpec(40, bias=True),
                       mamba=MambaSpec(num_heads=4, head_dim=8, n_groups=2, state_size=8, chunk_size=8),
                       attention=AttentionSpec(num_heads=4, num_kv_heads=4, head_dim=8),
                       moe=MoESpec(num_experts=8, top_k=2, intermediate_size=16, shared_intermediate_size=16,
                                   routed_scaling_factor=2.0))
    model = scaled(nj.HybridLM(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    states = nnx.jit(lambda m, t: m.layer_states(t))(model, tokens)
    return model, tokens, states, library.build_library(model, tokens)


def test_library_holds_each_kinds_options_ranked_on_the_parent(table):
    model, _, states, lib = table
    names = {}
    for c in lib:
        names.setdefault(c.layer, []).append(c.name)
    # Mamba: 75% = 3 heads cannot be the same number from each of the 2 groups kept
    assert names[0] == ["parent", "mamba_h50", "linear", "noop"]
    assert names[1] == ["parent", "mlp_w88", "mlp_w75", "mlp_w50", "mlp_w25", "mlp_w10", "linear", "noop"]
    assert names[2] == ["parent", "attn_kv2", "attn_kv1", "attn_win8", "attn_win4", "attn_win2", "linear", "noop"]
    by_key = {c.key: c for c in lib}
    assert [by_key[f"1:mlp_w{p}"].spec.intermediate_size for p in (88, 75, 50, 25, 10)] == [35, 30, 20, 10, 4]
    assert by_key["2:linear"].recipe == {"op": "linear_vo"} and by_key["1:linear"].recipe == {"op": "linear_fit"}
    h = [np.asarray(model.layers[i].norm(states[i]), np.float64).reshape(-1, 32) for i in range(4)]

    def top_channels(mlp, x, n):  # mean |relu(x W_up + b)^2| times ||row of W_down||, largest n
        up, down = mlp.up_proj, mlp.down_proj
        b = 0 if up.bias is None else np.asarray(up.bias[...])
        c = np.abs(np.maximum(x @ np.asarray(up.kernel[...]) + b, 0) ** 2).mean(0) * np.linalg.norm(
            np.asarray(down.kernel[...]), axis=1)
        return sorted(np.argsort(-c)[:n].tolist())

    assert by_key["1:mlp_w50"].recipe == {"op": "mlp_channels", "keep": top_channels(model.layers[1].mixer, h[1], 20)}
    moe = model.layers[3].mixer
    assert by_key["3:moe_shared50"].recipe["keep"] == top_channels(moe.shared_experts, h[3], 8)
    moe_input = model.layers[3].norm(states[3])
    removal = experts.removal_error(moe, moe_input)
    rcv = experts.ranked_choice(experts.router_preferences(moe, moe_input), 2)
    want = {"parent": None, "moe_top1": None, "moe_shared50": None, "linear": None, "noop": None}
    for p, n in ((75, 6), (50, 4), (25, 2)):
        want[f"moe_e{p}_rcv"] = sorted(rcv[:n].tolist())
        want[f"moe_e{p}_rem"] = sorted(np.argsort(-removal)[:n].tolist())
    for name in [n for n in want if n.endswith("_rem")]:  # a ranking that keeps what the other keeps is there once
        if want[name] == want[name.replace("_rem", "_rcv")]:
            del want[name]
    assert sorted(names[3]) == sorted(want)
    for name, keep in want.items():
        if keep is not None:
            assert by_key[f"3:{name}"].recipe == {"op": "experts", "keep": keep}
            assert by_key[f"3:{name}"].spec == dataclasses.replace(moe.spec, num_experts=len(keep))
    assert by_key["3:moe_top1"].spec.top_k == 1 and by_key["3:moe_shared50"].spec.shared_intermediate_size == 8


logits_of = nnx.jit(lambda m, t: m(t))


def test_parent_and_whole_recipes_rebuild_the_parent_exactly(table):
    model, tokens, states, lib = table
    parents = [c for c in lib if c.name == "parent"]
    assert [c.layer for c in parents] == [0, 1, 2, 3]
    whole = {i: library.materialize(model, c)[1:] for i, c in enumerate(parents)}
    np.testing.assert_array_equal(logits_of(model.replace_layers(whole), tokens), logits_of(model, tokens))
    s = model.cfg.layers
    everything = [library.Candidate(0, "mamba_h100", s[0], {"op": "mamba_heads", "keep": [0, 1, 2, 3]}),
                  library.Candidate(1, "mlp_w100", s[1], {"op": "mlp_channels", "keep": list(range(40))}),
                  library.Candidate(2, "attn_kv4", s[2], {"op": "kv_heads", "num_kv_heads": 4}),
                  library.Candidate(3, "moe_e100", s[3], {"op": "experts", "keep": list(range(8))}),
                  library.Candidate(3, "moe_top2", s[3], {"op": "top_k", "top_k": 2}),
                  library.Candidate(3, "moe_shared100", s[3], {"op": "shared_channels", "keep": list(range(16))})]
    built = [library.materialize(model, c) for c in everything]
    first = model.replace_layers({i: (spec, m) for i, spec, m in built[:4]})
    np.testing.assert_array_equal(logits_of(first, tokens), logits_of(model, tokens))
    for _, spec, module in built[4:]:
        np.testing.assert_array_equal(logits_of(model.replace_layers({3: (spec, module)}), tokens),
                                      logits_of(model, tokens))


def test_every_candidate_plugs_into_the_parent_and_runs(table):
    model, tokens, states, lib = table
    per_op = {}  # layer -> {op: its first candidate, materialised}
    for c in lib:
        layer, spec, module = library.materialize(model, c, layer_input=states[c.layer])
        assert model.replace_layers({layer: (spec, module)}).cfg.layers[layer] == c.spec  # replace_layers checks shapes
        per_op.setdefault(layer, {}).setdefault(c.recipe["op"], (spec, module))
    _, _, fitted = library.materialize(model, next(c for c in lib if c.key == "1:linear"), states[1])
    np.testing.assert_array_equal(fitted.linear.kernel[...], library.fit_linear(model.layers[1], states[1])[1]
                                  .linear.kernel[...])
    base = logits_of(model, tokens[:1, :8])
    options = {i: list(ops.values()) for i, ops in per_op.items()}
    for j in range(max(len(v) for v in options.values())):  # child j: construction j (cyclically) in every layer
        child = model.replace_layers({i: v[j % len(v)] for i, v in options.items()})
        out = np.asarray(logits_of(child, tokens[:1, :8]))
        assert out.shape == base.shape and np.all(np.isfinite(out))


def test_library_round_trips_through_json_and_restricts(table, tmp_path):
    model, _, _, lib = table
    meta = {"parent": "a run", "tokens": 32}
    library.save_library(tmp_path / "library.json", lib, meta)
    loaded, loaded_meta = library.load_library(tmp_path / "library.json", parent=model)
    assert loaded == lib and loaded_meta == meta
    assert library.load_library(tmp_path / "library.json")[0] == lib
    noop_only = library.restrict(lib, kinds={"noop"})
    assert [c.key for c in noop_only] == ["0:parent", "0:noop", "1:parent", "1:noop", "2:parent", "2:noop",
                                          "3:parent", "3:noop"]
    layer_2 = library.restrict(lib, layers=[2])
    assert [c.key for c in layer_2] == ["0:parent", "1:parent"] + [c.key for c in lib if c.layer == 2] + ["3:parent"]
    attn_on_2 = library.restrict(lib, kinds=["attention", "linear"], layers=[2, 3])
    assert {c.key for c in attn_on_2 if c.name != "parent"} == {
        "2:attn_kv2", "2:attn_kv1", "2:attn_win8", "2:attn_win4", "2:attn_win2", "2:linear", "3:linear"}
    with pytest.raises(ValueError, match="layer kinds from mamba"):
        library.restrict(lib, kinds=["conv"])
    with pytest.raises(ValueError, match=r"layer indices from \[0, 1, 2, 3\]"):
        library.restrict(lib, layers=[4])


def test_bad_library_entries_name_the_layer_and_candidate(table, tmp_path):
    import json

    model, _, states, lib = table
    path = tmp_path / "library.json"
    library.save_library(path, lib, {})
    good = json.loads(path.read_text())

    def load_with(n, **change):
        d = json.loads(json.dumps(good))
        d["candidates"][n].update(change)
        path.write_text(json.dumps(d))
        return library.load_library(path, parent=model)

    n = next(i for i, c in enumerate(lib) if c.key == "1:mlp_w50")
    with pytest.raises(ValueError, match=r"'1:mlp_w50' \(layer 1\).*unknown layer kind 'conv'"):
        load_with(n, spec={"kind": "conv"})
    with pytest.raises(ValueError, match=r"'1:mlp_w50' \(layer 1\).*distinct indices in \[0, 40\)"):
        load_with(n, recipe={"op": "mlp_channels", "keep": [3, 40]})
    with pytest.raises(ValueError, match=r"'1:mlp_w50' \(layer 1\).*builds MLPSpec\(intermediate_size=20"):
        load_with(n, spec={"kind": "mlp", "intermediate_size": 21, "bias": True})
    with pytest.raises(ValueError, match=r"'0:mlp_w50' \(layer 0\).*applies to mlp layers; parent layer 0 is 'mamba'"):
        load_with(n, layer=0)
    with pytest.raises(ValueError, match=r"'9:mlp_w50' \(layer 9\).*out of range for a parent of 4 layers"):
        load_with(n, layer=9)
    with pytest.raises(ValueError, match=r"'1:mlp_w50' \(layer 1\).*'op' is one of parent"):
        load_with(n, recipe={"op": "prune"})
    with pytest.raises(ValueError, match=r"'1:mlp_w50' \(layer 1\).*makes a 'noop' layer"):
        load_with(n, recipe={"op": "noop"})
    with pytest.raises(ValueError, match=r"\['1:mlp_w25'\] appear more than once"):
        load_with(n, name="mlp_w25")
    fit = next(c for c in lib if c.key == "3:linear")
    with pytest.raises(ValueError, match=r"'3:linear' \(layer 3\).*needs the layer's inputs.*states\(tokens\)\[3\]"):
        library.materialize(model, fit)
    with pytest.raises(ValueError, match=r"'2:kv3' \(layer 2\).*positive divisor of the parent's 4"):
        library.materialize(model, library.Candidate(2, "kv3", model.cfg.layers[2],
                                                     {"op": "kv_heads", "num_kv_heads": 3}))
    with pytest.raises(ValueError, match=r"'0:parent' \(layer 0\).*makes a 'mamba' layer, but the spec is NoOpSpec"):
        library.materialize(model, library.Candidate(0, "parent", NoOpSpec(), {"op": "parent"}))
    with pytest.raises(ValueError, match="unknown option"):
        library.build_library(model, states[0][:, :4, 0].astype(jnp.int32), options={"widths": (50,)})
