"""MoE layers in training: stats come out of a jitted value_and_grad, the aux loss reaches the router,
and the bias update acts on the right layers."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nemojax as nj
from nemojax.nn.ffn import configure_moe, pop_moe_stats, update_router_biases
from nemojax.nn.layers import RouterBias


def test_stats_through_jit_and_value_and_grad():
    model = nj.HybridLM(nj.presets.get("tiny-latent-mtp"), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
    plain = model(tokens)
    configure_moe(model, capacity_factor=1.0, collect_stats=True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest):
        def loss(p):
            m = nnx.merge(graphdef, p, rest)
            h = m.hidden_states(tokens)[0]
            m.mtp_logits(tokens, h)
            stats = pop_moe_stats(m)
            return sum(s["aux_loss"] for s in stats.values()), stats

        (aux, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        m = nnx.merge(graphdef, params, rest)
        update_router_biases(m, stats, 0.5)
        return aux, stats, grads, nnx.split(m, nnx.Param, ...)[2]

    aux, stats, grads, new_rest = step(params, rest)
    assert sorted(stats) == ["layers.1.mixer", "layers.3.mixer", "mtp.0.blocks.1.mixer"]
    for s in stats.values():
        assert s["load"].shape == (16,) and abs(float(s["load"].sum()) - 1) < 1e-6
        assert 0 <= float(s["dropped_fraction"]) < 1 and float(s["aux_loss"]) >= 1 - 1e-6
    assert float(jnp.abs(grads["layers"][1]["mixer"]["gate_weight"][...]).sum()) > 0  # aux loss reaches the router
    for path, s in stats.items():  # bias moved by +-0.5 towards balance, exactly where load differs from the mean
        layer = dict(nnx.to_flat_state(new_rest))[tuple(int(p) if p.isdigit() else p for p in path.split("."))
                                                   + ("e_score_correction_bias",)]
        n = np.asarray(s["counts"])
        np.testing.assert_array_equal(n.sum(), 2 * 12 * 4)
        np.testing.assert_allclose(layer.get_value(), 0.5 * np.sign(n.mean() - n), atol=1e-7)
    # sown stats never end up in the model's state, and inference output is unchanged by collecting them
    assert not jax.tree.leaves(nnx.state(nnx.merge(graphdef, params, rest), nnx.Intermediate))
    configure_moe(model, collect_stats=False)
    np.testing.assert_array_equal(model(tokens), plain)
    assert all(isinstance(v, RouterBias) for _, v in nnx.to_flat_state(rest))
