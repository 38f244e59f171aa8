"""MoE layers in training: stats come out of a jitted value_and_grad exactly as the trainer calls it,
the aux loss reaches the router, the bias update balances a skewed router, and generation / HF I/O
are untouched by stats collection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax as nj
from nemojax.config import MoESpec
from nemojax.nn.ffn import MoE, configure_moe, pop_moe_stats, update_correction_biases
from nemojax.nn.layers import CorrectionBias
from nemojax.ops.moe import moe_ffn, route, router_z_loss, seq_aux_loss

MOE_LAYERS = {"tiny-moe": ["layers.1.mixer", "layers.4.mixer"],
              "tiny-latent-mtp": ["layers.1.mixer", "layers.3.mixer", "mtp.0.blocks.1.mixer"]}


def test_stats_through_jit_and_value_and_grad():
    name = "tiny-moe"
    model = nj.HybridLM(nj.presets.get(name), rngs=nnx.Rngs(0))
    cfg = model.cfg
    b, length = 2, 12
    tokens = jax.random.randint(jax.random.key(1), (b, length), 0, cfg.vocab_size)
    inference_graph = nnx.graphdef(model)
    configure_moe(model, implementation="batched", capacity_factor=1.0, collect_stats=True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # as the trainer splits

    @jax.jit
    def step(params, rest):
        def loss(p):
            m = nnx.merge(graphdef, p, rest)
            h = m.hidden_states(tokens)[0]
            ce = -jnp.mean(jax.nn.log_softmax(m.logits(m.norm_f(h)))[..., 0])
            if m.mtp:
                m.mtp_logits(tokens, h)
            stats = pop_moe_stats(m)
            return ce + sum(s["aux_loss"] + 1e-3 * s["z_loss"] for s in stats.values()), stats

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        m = nnx.merge(graphdef, params, rest)
        update_correction_biases(m, stats, 0.5)
        return value, stats, grads, nnx.split(m, nnx.Param, ...)[2]

    value, stats, grads, new_rest = step(params, rest)
    assert sorted(stats) == MOE_LAYERS[name]
    e = next(s for s in cfg.layers if isinstance(s, MoESpec)).num_experts
    k = next(s for s in cfg.layers if isinstance(s, MoESpec)).top_k
    for s in stats.values():
        assert {key: v.shape for key, v in s.items()} == {"counts": (e,), "load": (e,), "dropped_fraction": (),
                                                         "aux_loss": (), "z_loss": ()}
        assert all(v.dtype == jnp.float32 for v in s.values())
        assert float(s["counts"].sum()) == b * length * k and abs(float(s["load"].sum()) - 1) < 1e-6
        assert 0 <= float(s["dropped_fraction"]) < 1 and float(s["z_loss"]) > 0
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["layers"][1]["mixer"]["gate_weight"][...]).sum()) > 0  # aux loss reaches the router
    flat_rest = dict(nnx.to_flat_state(new_rest))
    for path, s in stats.items():  # bias moved by +-0.5 towards balance, exactly where counts differ from the mean
        key = tuple(int(p) if p.isdigit() else p for p in path.split(".")) + ("correction_bias",)
        n = np.asarray(s["counts"])
        np.testing.assert_allclose(flat_rest[key].get_value(), 0.5 * np.sign(n.mean() - n), atol=1e-7)
    # the bias is not a parameter, sown stats never reach the model, and switching back restores the
    # inference model exactly (same static graph, so the same compiled forward)
    assert all(isinstance(v, CorrectionBias) for _, v in nnx.to_flat_state(rest))
    assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))
    configure_moe(model, implementation=None, capacity_factor=None, collect_stats=False)
    assert nnx.graphdef(model) == inference_graph


def small_moe(**kw):
    spec = MoESpec(num_experts=8, top_k=2, intermediate_size=16, **kw)
    return MoE(spec, 12, std=0.02, out_std=0.1, dtype=jnp.float32, rngs=nnx.Rngs(3))


def test_layer_stats_match_the_formulas_and_capacity_keeps_the_shared_expert():
    moe = small_moe(shared_intermediate_size=8, n_group=2, topk_group=1, routed_scaling_factor=2.5)
    moe.correction_bias[...] = jnp.linspace(-0.3, 0.3, 8)
    configure_moe(moe, implementation="ragged", capacity_factor=0.5, collect_stats=True)
    graphdef, state = nnx.split(moe)
    x = jax.random.normal(jax.random.key(4), (3, 10, 12))

    @jax.jit
    def layer_and_oracle(state):
        m = nnx.merge(graphdef, state)
        y = m(x)[0]
        stats = pop_moe_stats(m)[""]
        m(x.reshape(30, 12))  # a [T, D] input is one sequence
        flat_stats = pop_moe_stats(m)[""]
        x_TD = x.reshape(-1, 12)
        logits = x_TD @ m.gate_weight[...]
        w, idx = route(logits, m.correction_bias[...], top_k=2, n_group=2, topk_group=1,
                       routed_scaling_factor=2.5)
        routed, ref = moe_ffn(x_TD, w, idx, m.up_proj[...], m.down_proj[...], implementation="dense",
                              capacity_factor=0.5, return_stats=True)
        losses = seq_aux_loss(logits.reshape(3, 10, 8), 2), seq_aux_loss(logits[None], 2), router_z_loss(logits)
        return y, stats, flat_stats, idx, routed + m.shared_experts(x_TD)[0], ref, losses

    y, stats, flat_stats, idx, y_ref, ref, (aux, aux_flat, z) = layer_and_oracle(state)
    np.testing.assert_allclose(y.reshape(-1, 12), y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats["counts"], np.bincount(np.asarray(idx).ravel(), minlength=8))
    np.testing.assert_allclose(stats["dropped_fraction"], ref["dropped_fraction"])
    assert float(stats["dropped_fraction"]) > 0
    np.testing.assert_allclose(stats["aux_loss"], aux, rtol=1e-6)
    np.testing.assert_allclose(stats["z_loss"], z, rtol=1e-6)
    np.testing.assert_allclose(flat_stats["aux_loss"], aux_flat, rtol=1e-6)
    assert abs(float(aux) - float(aux_flat)) > 1e-4  # the sequence split matters

    # the recorded aux loss is differentiable and its gradient reaches the router weight only
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def recorded_aux(params):
        m = nnx.merge(graphdef, params, rest)
        m(x)
        return pop_moe_stats(m)[""]["aux_loss"]

    grads = jax.jit(jax.grad(recorded_aux))(params)
    direct = jax.grad(lambda w: seq_aux_loss((x @ w).reshape(3, 10, 8), 2))(params["gate_weight"][...])
    assert float(jnp.abs(direct).max()) > 0
    np.testing.assert_allclose(grads["gate_weight"][...], direct, rtol=1e-4, atol=1e-7)
    assert not float(jnp.abs(grads["up_proj"][...]).max())


def test_bias_updates_alone_balance_a_skewed_router():
    moe = small_moe()
    moe.gate_weight[...] = (0.3 * jax.random.normal(jax.random.key(9), (12, 8))).at[:, :3].add(0.3)
    configure_moe(moe, collect_stats=True)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    @jax.jit
    def balance_step(rest, key):  # a fresh batch every step; experts 0-2 win almost every token at first
        m = nnx.merge(graphdef, params, rest)
        m(jax.random.normal(key, (512, 12)) + 1.0)
        stats = pop_moe_stats(m)
        update_correction_biases(m, stats, 0.02)
        return nnx.split(m, nnx.Param, ...)[2], stats[""]["load"]

    loads = []
    for step in range(40):
        rest, load = balance_step(rest, jax.random.key(step))
        loads.append(np.asarray(load))
    loads = np.array(loads)
    spread = loads.max(1) / np.maximum(loads.min(1), 1e-3)  # max/min load ratio per step
    assert spread[0] > 20 and spread[-10:].max() < 4
    assert loads[-10:].var(axis=1).max() < 0.1 * loads[0].var()
    bias = nnx.merge(graphdef, params, rest).correction_bias[...]
    assert float(bias[:3].max()) < float(bias[3:].min())  # the popular experts were pushed down


def test_configure_moe_reaches_every_layer_including_mtp_and_names_bad_values():
    model = nj.HybridLM(nj.presets.get("tiny-latent-mtp"), rngs=nnx.Rngs(0))
    configure_moe(model, implementation="dense", capacity_factor=2.0)
    moes = [m for _, m in nnx.iter_modules(model) if isinstance(m, MoE)]
    assert len(moes) == 3 and all(m.implementation == "dense" and m.capacity_factor == 2.0 for m in moes)
    assert not any(m.collect_stats for m in moes)  # collect_stats=None leaves it alone
    configure_moe(model, collect_stats=True)  # the settings not given stay as they are
    assert all(m.implementation == "dense" and m.capacity_factor == 2.0 and m.collect_stats for m in moes)
    configure_moe(model, implementation=None, capacity_factor=None)  # None: the backend default, dropless
    assert all(m.implementation is None and m.capacity_factor is None and m.collect_stats for m in moes)
    assert [p for p, m in nnx.iter_modules(model) if isinstance(m, MoE)] == [
        tuple(int(q) if q.isdigit() else q for q in p.split(".")) for p in MOE_LAYERS["tiny-latent-mtp"]]
    with pytest.raises(ValueError, match="implementation must be None or one of"):
        configure_moe(model, implementation="megablox")
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        configure_moe(model, capacity_factor=-1.0)
    assert pop_moe_stats(nj.HybridLM(nj.presets.get("tiny-hybrid"), rngs=nnx.Rngs(0))) == {}


def test_generate_and_hf_io_after_collecting_stats(tmp_path):
    model = nj.HybridLM(nj.presets.get("tiny-moe"), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (1, 6), 0, 256)
    configure_moe(model, collect_stats=True)
    nnx.jit(lambda m, t: m(t))(model, tokens)  # stats sown and left in place (jitted: eager MoE compiles op by op)
    nj.save_pretrained(model, tmp_path)
    loaded = nj.load_pretrained(tmp_path, progress=False)
    assert not jax.tree.leaves(nnx.state(loaded, nnx.Intermediate))
    original = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Intermediate))))
    reloaded = dict(nnx.to_flat_state(nnx.state(loaded)))
    assert original.keys() == reloaded.keys()
    for key, var in original.items():
        np.testing.assert_array_equal(reloaded[key].get_value(), var.get_value())
    configure_moe(model, capacity_factor=0.5, collect_stats=True)  # a training setup, left on
    out = nj.generate(model, tokens, max_new_tokens=3)  # runs on a dropless, stat-free copy
    np.testing.assert_array_equal(out[:, :6], tokens)
    # oracle: one uncached causal forward of a model configured for inference; position t's argmax is what
    # greedy decoding picks after t
    full = nnx.jit(lambda m, t: m(t))(loaded, out[:, :-1])
    np.testing.assert_array_equal(out[:, 6:], jnp.argmax(full[:, 5:], -1))
    assert [m.capacity_factor for _, m in nnx.iter_modules(model) if isinstance(m, MoE)] == [0.5, 0.5]  # the caller's setup is kept
    assert set(pop_moe_stats(model)) == set(MOE_LAYERS["tiny-moe"])
