"""Low-precision training: the quantised matmul's forward and both gradients against plain NumPy
matmuls of operands quantised explicitly with `quantize`, the Hadamard identity, identity quantisers
giving the unquantised training step bit for bit, the high-precision layers left alone, a few NVFP4
steps that learn, resume bit for bit with stochastic rounding, and flag errors that name the field."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.cli import main
from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, from_pattern
from nemojax.quant import quantize, random_hadamard
from nemojax.quant.linear import RECIPES, Precision, quantized_matmul
from nemojax.quant.training import configure_precision
from nemojax.train import TrainConfig, loop
from nemojax.train.step import make_train_step

NO_2D = dataclasses.replace(RECIPES["nvfp4"], weight_blocks_2d=False)
NO_RHT = dataclasses.replace(RECIPES["nvfp4"], hadamard=False)
MX = Precision("mxfp4", "mxfp4", "fp8_e5m2", weight_blocks_2d=True)
CASES = {"fp8": RECIPES["fp8"], "nvfp4": RECIPES["nvfp4"], "nvfp4-no-2d": NO_2D, "nvfp4-no-rht": NO_RHT, "mx": MX}


def _operands():
    """x [2, 20, 48] (40 tokens: not a multiple of 16, so the Hadamard path pads), w [48, 40] (output
    features not a multiple of 16 either), a cotangent g [2, 20, 40]; a few activation outliers."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 20, 48)).astype(np.float32)
    x[0, 3, 5] = 25.0
    w = (rng.standard_normal((48, 40)) / 7).astype(np.float32)
    g = rng.standard_normal((2, 20, 40)).astype(np.float32)
    return x, w, g


def _blockwise_hadamard(t, h):
    """NumPy: H times every run of 16 rows of t [T, C] (T zero-padded to a multiple of 16)."""
    t = np.pad(t, ((0, -len(t) % 16), (0, 0)))
    return np.concatenate([h @ t[i:i + 16] for i in range(0, len(t), 16)])


def _reference(x, w, g, p: Precision, key):
    """(y, dx, dw) as float64 matmuls of operands each quantised explicitly as the recipe says."""
    def q(a, fmt, axis, k=None):
        if fmt is None:
            return np.asarray(a, np.float64)
        sr = k is not None and p.stochastic_rounding
        return np.asarray(quantize(jnp.asarray(a, jnp.float32), fmt, axis=axis, rounding="stochastic" if sr else "nearest",
                                   key=k if sr else None), np.float64)

    k_dgrad, k_wgrad, k_rht = jax.random.split(key, 3)
    w_fprop = q(w, p.weights, (0, 1) if p.weight_blocks_2d else 0)
    w_dgrad = w_fprop if p.weight_blocks_2d else q(w, p.weights, 1)
    y = q(x, p.activations, -1) @ w_fprop
    dx = q(g, p.gradients, -1, k_dgrad) @ w_dgrad.T
    x_t, g_t = x.reshape(-1, x.shape[-1]).astype(np.float64), g.reshape(-1, g.shape[-1]).astype(np.float64)
    if p.hadamard:
        h = np.asarray(random_hadamard(k_rht), np.float64)
        x_t, g_t = _blockwise_hadamard(x_t, h), _blockwise_hadamard(g_t, h)
    dw = q(x_t, p.activations, 0).T @ q(g_t, p.gradients, 0, k_wgrad)
    return y, dx, dw


def _run(x, w, g, p, key):
    y, vjp = jax.vjp(lambda a, b: quantized_matmul(a, b, p, key), jnp.asarray(x), jnp.asarray(w))
    return (np.asarray(y, np.float64),) + tuple(np.asarray(t, np.float64) for t in vjp(jnp.asarray(g)))


@pytest.mark.parametrize("name", CASES)
def test_each_matmul_uses_its_explicitly_quantised_operands(name):
    x, w, g = _operands()
    p, key = CASES[name], jax.random.key(7)
    got = _run(x, w, g, p, key)
    want = _reference(x, w, g, p, key)
    plain = (x.astype(np.float64) @ w, g.astype(np.float64) @ w.T,
             x.reshape(-1, 48).astype(np.float64).T @ g.reshape(-1, 40))
    for what, a, b, c in zip(("y", "dx", "dw"), got, want, plain):
        scale = np.max(np.abs(b))
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * scale, err_msg=what)
        assert np.max(np.abs(b - c)) > 1e-3 * scale, f"{what}: quantisation changed nothing, the test would be vacuous"


def test_stochastic_rounding_follows_the_key():
    x, w, g = _operands()
    a, b = (_run(x, w, g, RECIPES["nvfp4"], jax.random.key(s)) for s in (1, 2))
    np.testing.assert_array_equal(a[0], b[0])  # the forward rounds to nearest
    assert not np.array_equal(a[1], b[1]) and not np.array_equal(a[2], b[2])
    with pytest.raises(ValueError, match="needs a key"):
        jax.grad(lambda w_: quantized_matmul(jnp.asarray(x), w_, RECIPES["nvfp4"]).sum())(jnp.asarray(w))


def test_hadamard_weight_gradient_equals_the_plain_one_without_quantisation():
    x, w, g = _operands()
    with_rht = _run(x, w, g, Precision(hadamard=True), jax.random.key(3))
    without = _run(x, w, g, Precision(), None)
    np.testing.assert_array_equal(with_rht[1], without[1])  # Dgrad never sees H
    np.testing.assert_allclose(with_rht[2], without[2], rtol=0, atol=1e-5 * np.max(np.abs(without[2])))
    assert not np.array_equal(with_rht[2], without[2])  # the transform really ran


# Small enough to compile in seconds, with every kind of quantised layer: Mamba, attention, MLP.
SMALL = from_pattern("M-*", vocab_size=256, hidden_size=32, name="small",
                     mamba=MambaSpec(num_heads=2, head_dim=16, n_groups=1, state_size=16, chunk_size=16),
                     attention=AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=16), mlp=MLPSpec(64))


def _tc(tmp_path=None, name="run", **kw):
    base = dict(data="text", seq_len=32, batch_size=2, steps=8, warmup_steps=1, save_every=4, eval_every=4,
                eval_batches=1, log_every=1, sample_tokens=0, lr=1e-2)
    if tmp_path is not None:
        base["out_dir"] = str(tmp_path / name)
    return TrainConfig(**(base | kw))


def _batches(tc):
    ds = loop.make_dataset(tc)
    return lambda i: jax.tree.map(jnp.asarray, ds.batch(i))


def _one_step(tc, recipe=None):
    model = loop.build_model(tc, 256, SMALL)
    if recipe is not None:
        configure_precision(model, recipe)  # every layer, none kept in high precision
    graphdef, tx, state = loop.init_state(tc, model)
    state, metrics = make_train_step(graphdef, tx, tc)(state, _batches(tc)(0))
    return jax.tree.map(np.asarray, (state["params"], metrics["loss"]))


@pytest.mark.parametrize("name, dtype", [("fp8", "float32"), ("nvfp4", "bfloat16")])
def test_identity_quantisers_give_the_unquantised_step_exactly(name, dtype):
    """The recipe's custom backward with every quantiser the identity (the Hadamard off: it is exact only
    up to rounding) is the plain training step, bit for bit: all three matmuls are wired right."""
    tc = _tc(compute_dtype=dtype)
    identity = dataclasses.replace(RECIPES[name], weights=None, activations=None, gradients=None, hadamard=False)
    (params, loss), (ref_params, ref_loss) = _one_step(tc, identity), _one_step(tc)
    assert loss == ref_loss
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_high_precision_layers_are_left_unquantised():
    """Every block of a model configured fp8 with first=1,last=1, on the same input: the outer blocks'
    outputs and parameter gradients equal the unquantised model's bit for bit, the middle one's do not."""
    model = loop.build_model(_tc(), 256, SMALL)
    reference = nnx.clone(model)
    assert configure_precision(model, RECIPES["fp8"], first=1, last=1) == (1,)
    x = jax.random.normal(jax.random.key(1), (2, 16, SMALL.hidden_size))

    @partial(jax.jit, static_argnums=0)
    def blocks_and_grads(graphdef, params, rest):
        """Each block's output on x, and the gradient of sum(output) for each block's parameters."""
        def total(p):
            m = nnx.merge(graphdef, p, rest)
            outs = [block(x)[0] for block in m.layers]
            return sum(jnp.sum(o) for o in outs), outs
        return jax.grad(total, has_aux=True)(params)

    results = []
    for m in (model, reference):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        grads, outs = blocks_and_grads(graphdef, params, rest)
        results.append([jax.tree.leaves((outs[i], grads["layers"][i])) for i in range(len(SMALL.layers))])
    for i, (got, want) in enumerate(zip(*results)):
        same = all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
        assert same == (i != 1), f"layer {i}"


@pytest.fixture(scope="module")
def straight_nvfp4():
    """(config, per-step losses, host copies of the state after every step) of an uninterrupted nvfp4
    run with every layer quantised."""
    tc = _tc(precision="nvfp4", high_precision_layers="first=0,last=0")
    graphdef, tx, state = loop.init_state(tc, loop.build_model(tc, 256, SMALL))
    step, batch = make_train_step(graphdef, tx, tc), _batches(tc)
    losses, states = [], []
    for i in range(tc.steps):
        state, metrics = step(state, batch(i))
        losses.append(float(metrics["loss"]))
        states.append(jax.tree.map(np.asarray, state))
    return tc, losses, states


def test_a_few_nvfp4_steps_reduce_the_loss(straight_nvfp4):
    _, losses, _ = straight_nvfp4
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0] - 0.5, losses


def test_resumed_nvfp4_run_equals_the_straight_run(straight_nvfp4):
    """Stochastic rounding and the Hadamard signs come from (seed, step): a fresh model, optimizer and
    compiled step (a new process), continuing from the state saved after step 3 (what a checkpoint
    holds; the loop's own resume is tested in tests/train/test_trainer.py), end on the straight run's
    state bit for bit."""
    tc, _, states = straight_nvfp4
    graphdef, tx, _ = loop.init_state(tc, loop.build_model(tc, 256, SMALL))
    step, batch = make_train_step(graphdef, tx, tc), _batches(tc)
    state = jax.tree.map(jnp.asarray, states[2])
    for i in range(3, tc.steps):
        state, _ = step(state, batch(i))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states[-1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(states[-2]), jax.tree.leaves(states[-1])))


def test_bad_precision_settings_name_the_field(capsys):
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp4")
    with pytest.raises(ValueError, match="precision_disable.*'hadamard'"):
        TrainConfig(precision="fp8", precision_disable="hadamard")  # FP8 has no Hadamard to switch off
    with pytest.raises(ValueError, match="precision_disable"):
        TrainConfig(precision="nvfp4", precision_disable="rht")
    for bad in ("2,8", "first=2", "first=2,last=-1", "first=1,first=2,last=1", "first=a,last=1"):
        with pytest.raises(ValueError, match="high_precision_layers"):
            TrainConfig(precision="nvfp4", high_precision_layers=bad)
    with pytest.raises(ValueError, match="high_precision_layers"):
        TrainConfig(high_precision_layers="first=1,last=1")  # bf16 quantises nothing
    with pytest.raises(ValueError, match="high_precision_layers first=2,last=1 keeps all 3 layers"):
        loop.build_model(_tc(precision="nvfp4", high_precision_layers="first=2,last=1"), 256, SMALL)
    with pytest.raises(ValueError, match="Precision.gradients"):
        Precision(gradients="fp16")
    tc = TrainConfig(precision="nvfp4", precision_disable="hadamard,stochastic_rounding")
    assert tc.precision_recipe() == dataclasses.replace(RECIPES["nvfp4"], hadamard=False, stochastic_rounding=False)
    for flags, field in ((["--precision", "fp4"], "precision"),
                         (["--precision", "nvfp4", "--high-precision-layers", "2,8"], "high_precision_layers"),
                         (["--precision", "fp8", "--precision-disable", "hadamard"], "precision_disable")):
        with pytest.raises(SystemExit) as exit_:
            main(["train", *flags])
        assert exit_.value.code == 2 and f"nemojax train: error: {field}" in capsys.readouterr().err
