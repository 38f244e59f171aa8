"""Low-precision routed experts: every dispatch's quantised expert GEMMs (forward and the gradients of x,
the gate weights and both expert weights) against a per-expert Python loop of `quantized_matmul` on
that expert's own tokens; the per-group quantiser against a loop of `quantize` over the groups; and a
model configured fp8 that really quantises its experts (the training step differs from bf16's only
through them)."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax as nj
from nemojax.config import MoESpec, from_pattern
from nemojax.nn.ffn import MoE
from nemojax.ops.ffn import relu2
from nemojax.ops.moe import IMPLEMENTATIONS, moe_ffn
from nemojax.quant import quantize
from nemojax.quant.formats import quantize_groups
from nemojax.ops.moe.dispatch import BATCHED
from nemojax.quant.linear import RECIPES, Precision, grouped_quantized_matmul, quantized_matmul
from nemojax.quant.training import configure_precision

NVFP4 = RECIPES["nvfp4"]
NEAREST = dataclasses.replace(NVFP4, stochastic_rounding=False)  # deterministic: comparable bit for bit
CASES = {"fp8": RECIPES["fp8"], "nvfp4-nearest": NEAREST,
         "nvfp4-nearest-no-2d": dataclasses.replace(NEAREST, weight_blocks_2d=False),
         "mx": Precision("mxfp4", "mxfp4", "fp8_e5m2", weight_blocks_2d=True)}
DISPATCHES = tuple(i for i in IMPLEMENTATIONS if i != "dense")
# the recipe on every dispatch (the dispatches differ only in the GEMM they hand the shared quantised
# matmul), each other variant on one of them: every pair compiles twice (~5 s each on 2 cores)
COVER = {"fp8": ("loop",), "nvfp4-nearest": DISPATCHES, "nvfp4-nearest-no-2d": ("batched",), "mx": ("ragged",)}


def _problem(t=40, d=48, f=40, e=4, k=2):
    """x [T, D] with an outlier, gate weights, distinct top-k experts (expert 0 popular: more than 16
    tokens, several Wgrad blocks; expert 3 receives nothing), expert weights; D and F not multiples of 16."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((t, d)).astype(np.float32)
    x[7, 3] = 20.0
    pref = rng.uniform(size=(t, e)) * np.array([0.2, 1.0, 1.0, np.inf])
    idx = np.argsort(pref, axis=1)[:, :k].astype(np.int32)
    w = rng.uniform(size=(t, k)).astype(np.float32)
    up = (rng.standard_normal((e, d, f)) / 7).astype(np.float32)
    down = (rng.standard_normal((e, f, d)) / 7).astype(np.float32)
    return x, w, jnp.asarray(idx), up, down


def _reference(x, w, idx, up, down, p, key):
    """sum_k w_tk expert_e(x_t) with each expert a pair of `quantized_matmul`s on its tokens x_e (those
    routed to it, in token order), the up and down GEMMs taking the two halves of split(key)."""
    k_up, k_down = jax.random.split(key)
    y = jnp.zeros(x.shape, jnp.float32)
    for e in range(up.shape[0]):
        tokens, slots = np.nonzero(np.asarray(idx) == e)
        if len(tokens) == 0:
            continue
        h = relu2(quantized_matmul(x[tokens], up[e], p, k_up)).astype(x.dtype)
        y_e = quantized_matmul(h, down[e], p, k_down)
        y = y.at[tokens].add(w[tokens, slots][:, None] * y_e)
    return y


def _value_and_grads(fn, x, w, up, down, probe):
    return jax.value_and_grad(lambda *a: jnp.sum(probe * fn(*a)), argnums=(0, 1, 2, 3))(x, w, up, down)


@pytest.fixture(scope="module")
def unquantised():
    """(problem, probe, value and gradients of the unquantised experts)."""
    x, w, idx, up, down = _problem()
    probe = jax.random.normal(jax.random.key(1), x.shape)
    plain = jax.jit(partial(_value_and_grads, lambda *a: moe_ffn(a[0], a[1], idx, a[2], a[3], implementation="batched")))
    return (x, w, idx, up, down), probe, plain(x, w, up, down, probe)


@pytest.mark.parametrize("name", CASES)
def test_each_dispatch_quantises_like_a_loop_over_the_experts(name, unquantised):
    (x, w, idx, up, down), probe, plain = unquantised
    p, key = CASES[name], jax.random.key(5)
    want = jax.jit(partial(_value_and_grads, lambda *a: _reference(a[0], a[1], idx, a[2], a[3], p, key)))(
        x, w, up, down, probe)
    assert set(DISPATCHES) == {i for d in COVER.values() for i in d}
    for impl in COVER[name]:
        got = jax.jit(partial(_value_and_grads, lambda *a: moe_ffn(
            a[0], a[1], idx, a[2], a[3], implementation=impl, precision=p, rounding_key=key)))(x, w, up, down, probe)
        for what, a, b, c in zip(("y", "dx", "dw", "dup", "ddown"), jax.tree.leaves(got), jax.tree.leaves(want),
                                 jax.tree.leaves(plain)):
            scale = np.max(np.abs(b))
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale, err_msg=f"{impl} {what}")
            assert np.max(np.abs(np.asarray(b) - c)) > 1e-3 * scale, f"{what}: quantisation changed nothing"


def test_stochastic_rounding_of_expert_gradients_is_unbiased(unquantised):
    """NVFP4 with stochastic rounding (its draws run over the dispatch's own layout, so there is no
    bitwise reference; the Hadamard off, so that the expectation is a fixed function), on the CPU's
    default dispatch: the forward is the nearest-rounding reference's, the gradients change with the key,
    and their mean over keys converges to the reference with unquantised gradients (every rounded
    gradient enters the backward linearly)."""
    (x, w, idx, up, down), probe, _ = unquantised
    sr = dataclasses.replace(NVFP4, hadamard=False)
    exact_grads = dataclasses.replace(sr, gradients=None)
    want = jax.jit(partial(_value_and_grads, lambda *a: _reference(a[0], a[1], idx, a[2], a[3], exact_grads,
                                                                   jax.random.key(0))))(x, w, up, down, probe)
    for impl in ("loop",):
        run = jax.jit(lambda key: _value_and_grads(lambda *a: moe_ffn(
            a[0], a[1], idx, a[2], a[3], implementation=impl, precision=sr, rounding_key=key), x, w, up, down, probe))
        runs = [run(jax.random.key(s)) for s in range(16)]
        for r in runs:
            np.testing.assert_allclose(r[0], want[0], rtol=1e-6)
        for i in (0, 2, 3):  # x, up, down (the gate weights' gradient needs only the forward)
            got, ref = np.stack([r[1][i] for r in runs]), np.asarray(want[1][i])
            assert not np.array_equal(got[0], got[1]), f"{impl} grad {i} ignores the key"
            single = np.mean([np.sqrt(np.mean((g - ref) ** 2)) for g in got])
            # 16 independent draws: the mean's error about a quarter of one draw's
            assert np.sqrt(np.mean((got.mean(0) - ref) ** 2)) < 0.4 * single, f"{impl} grad {i}"


def test_bad_quantised_expert_settings_are_named(unquantised):
    (x, w, idx, up, down), _, _ = unquantised
    with pytest.raises(ValueError, match="implementation 'dense' cannot quantise"):
        moe_ffn(x, w, idx, up, down, implementation="dense", precision=RECIPES["fp8"])
    with pytest.raises(ValueError, match="rows R=40 must be a multiple of row_alignment=16"):
        grouped_quantized_matmul(x, up, jnp.array([16, 16, 8, 0]), NVFP4, gemm=BATCHED)
    with pytest.raises(ValueError, match="precision must be a Precision"):
        grouped_quantized_matmul(x, up, jnp.array([16, 16, 8, 0]), "nvfp4", gemm=BATCHED)


@pytest.mark.parametrize("fmt, axis, sizes", [("fp8_e5m2", -1, (5, 0, 19, 8)), ("nvfp4", -1, (5, 0, 19, 8)),
                                              ("nvfp4", 0, (16, 0, 32, 0)), ("mxfp4", 0, (32, 0, 0, 32))])
def test_quantize_groups_equals_quantize_per_group(fmt, axis, sizes):
    """Each group of rows quantised as its own tensor, with its own scale (rows past the groups: one
    more group)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((sum(sizes) + 8, 24)).astype(np.float32)
    x[2] *= 50  # an outlier row in the first group: the other groups must not see its amax
    got = np.asarray(quantize_groups(x, fmt, jnp.asarray(sizes), axis=axis))
    starts = np.cumsum((0,) + sizes)
    for a, b in zip(starts, list(starts[1:])):
        if b > a:
            np.testing.assert_array_equal(got[a:b], quantize(x[a:b], fmt, axis=axis))
    np.testing.assert_array_equal(got[starts[-1]:], quantize(x[starts[-1]:], fmt, axis=axis))
    # per-group scales are not the tensor's (MXFP4 has no tensor scale: its blocks are all there is)
    assert np.array_equal(got, quantize(x, fmt, axis=axis)) == (fmt == "mxfp4")
    with pytest.raises(ValueError, match="axis must be -1, 0 or 1"):
        quantize_groups(x, fmt, jnp.asarray(sizes), axis=(0, 1))


MOE_ONLY = from_pattern("EE", vocab_size=64, hidden_size=32, name="moe",
                        moe=MoESpec(num_experts=4, top_k=2, intermediate_size=48, shared_intermediate_size=0))


def test_fp8_training_quantises_the_expert_weights():
    """A model of two MoE layers without shared experts (so the routed experts are its only quantisable
    matmuls) configured fp8: its loss and its expert weights' gradients differ from the bf16 model's."""
    model = nj.HybridLM(MOE_ONLY, rngs=nnx.Rngs(0))
    reference = nnx.clone(model)
    # the high-precision layers hold for MoE layers too
    assert configure_precision(model, RECIPES["fp8"], first=1) == (1,)
    assert [m.mixer.precision for m in model.layers] == [None, RECIPES["fp8"]]
    assert configure_precision(model, RECIPES["fp8"]) == (0, 1)
    assert all(m.precision == RECIPES["fp8"] for _, m in nnx.iter_modules(model) if isinstance(m, MoE))
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, 64)

    def grads(m):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens))))(params)

    (loss, g), (ref_loss, ref_g) = grads(model), grads(reference)
    assert loss != ref_loss
    for i in range(2):
        for name in ("up_proj", "down_proj"):
            a, b = g["layers"][i]["mixer"][name][...], ref_g["layers"][i]["mixer"][name][...]
            assert np.max(np.abs(a - b)) > 1e-3 * np.max(np.abs(b)), (i, name)
