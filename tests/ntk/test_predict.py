"""Training-free damage predictions: the alpha-order law against the cross-kernels it is the leading
order of, the cross-kernel output change against finite networks, and a language model's empirical
NTK against the JVP/VJP one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import sphere_points

import nemojax as nj
from nemojax.config import NoOpSpec
from nemojax import ntk

PROFILE = np.array([1.0, 0.7, 1.3, 0.9])
REPLACEMENTS = [{1: "remove"}, {2: "linear"}, {0: ("fuse", 1)}, {1: ("fuse", 3)}, {0: "remove", 2: ("fuse", 3)}]


@pytest.mark.parametrize("replace", REPLACEMENTS, ids=str)
def test_alpha_law_is_the_leading_order_of_the_cross_kernel_change(replace):
    """surgery_change / alpha_law -> 1 as alpha -> 0, with an error of the next order (the kink of relu
    gives fusion an alpha^5 term, so the error shrinks like alpha, not alpha^2)."""
    errors = [abs(ntk.surgery_change(a * PROFILE, replace) / ntk.alpha_law(a * PROFILE, replace) - 1)
              for a in (1e-2, 1e-3)]
    assert errors[1] < 3e-3
    assert errors[1] < errors[0] / 5


def test_alpha_law_orders():
    """Removal and linearisation scale like alpha^2, fusion like alpha^4; the law's constants."""
    a = np.array([0.3, 0.2, 0.5])
    assert ntk.alpha_law(a, {1: "remove"}) == pytest.approx(0.04)
    assert ntk.alpha_law(a, {1: "linear"}) == pytest.approx(0.04 * (0.5 - 1 / np.pi))
    assert ntk.alpha_law(a, {0: ("fuse", 2)}) == pytest.approx(0.09 * 0.04 + 0.25 * (0.09 + 0.04))
    assert ntk.alpha_law(2 * a, {0: ("fuse", 1)}) == pytest.approx(16 * ntk.alpha_law(a, {0: ("fuse", 1)}))


def finite_stream(rng, X, alphas, replace, m):
    """The residual stream x_L [n, m] of one random finite network (NumPy, straight from the definition in
    ntk.resnet) and of the same weights after `replace`: block l reads u_l = x_{l-1}, or a fused run's
    input; relu, or for a linearised block its Hermite stand-in z/2 + |u|/sqrt(2 pi m)."""
    A = rng.standard_normal((m, X.shape[1]))
    weights = [(rng.standard_normal((m, m)), rng.standard_normal((m, m))) for _ in alphas]
    out = []
    for rep in ({}, replace):
        h = X @ A.T
        u, run_end = h, -1
        for l, (a, (W, V)) in enumerate(zip(alphas, weights)):
            op = rep.get(l)
            if l > run_end:  # not inside a fused run: read the current stream
                u = h
                run_end = op[1] if isinstance(op, tuple) else l
            if op == "remove":
                continue
            z = u @ W.T / np.sqrt(m)
            act = (z / 2 + np.linalg.norm(u, axis=1, keepdims=True) / np.sqrt(2 * np.pi * m) if op == "linear"
                   else np.maximum(z, 0))
            h = h + a * np.sqrt(2 / m) * act @ V.T
        out.append(h)
    return out


@pytest.mark.parametrize("replace", [{1: "remove"}, {2: "linear"}, {0: ("fuse", 1)}, {0: ("fuse", 2)}], ids=str)
def test_surgery_change_matches_finite_networks(replace):
    """|x_L^B - x_L^A|^2 / |x_L^A|^2 (= Var(f_B - f_A) / Var f_A over the readout) of wide random networks,
    weights shared between A and B = A after the surgery, against the infinite-width cross-kernel value."""
    alphas, rng = [0.9, 0.6, 1.2], np.random.default_rng(0)
    X = sphere_points(16, 3)
    num = den = 0.0
    for _ in range(3):
        xa, xb = finite_stream(rng, X, alphas, replace, m=1024)
        num, den = num + np.sum((xb - xa) ** 2), den + np.sum(xa ** 2)
    assert num / den == pytest.approx(ntk.surgery_change(alphas, replace), rel=0.08)


def test_surgery_change_of_removing_a_lone_block():
    """One block: f_A = x + block, f_B = x; Var block / Var f_A = alpha^2 / (1 + alpha^2) (kappa1(1) = 1)."""
    assert ntk.surgery_change([0.5], {0: "remove"}) == pytest.approx(0.25 / 1.25, rel=1e-12)


@pytest.fixture(scope="module")
def small_lm():
    """tiny-hybrid (M-M*-) with layers 1 and 2 removed: Mamba, no-op, no-op, attention, MLP."""
    model = nj.HybridLM(nj.presets.get("tiny-hybrid"), rngs=nnx.Rngs(0))
    return model.replace_layers({1: (NoOpSpec(), None), 2: (NoOpSpec(), None)})


def test_bad_inputs_fail_early(small_lm):
    with pytest.raises(ValueError, match="alpha must be"):
        ntk.alpha_law([[0.1, 0.2]], {0: "remove"})
    with pytest.raises(ValueError, match="alpha must be"):
        ntk.surgery_change([0.1, -0.2], {0: "remove"})
    with pytest.raises(ValueError, match="at least one block"):
        ntk.alpha_law([0.1, 0.2], {})
    with pytest.raises(ValueError, match=r"replace\[0\]"):
        ntk.surgery_change([0.1, 0.2], {0: "drop"})
    with pytest.raises(ValueError, match="tokens must be"):
        ntk.lm_empirical_ntk(small_lm, np.zeros(8, np.int32), np.ones(256))
    with pytest.raises(ValueError, match="projection has 3 entries"):
        ntk.lm_empirical_ntk(small_lm, np.zeros((2, 8), np.int32), np.ones(3))


def test_lm_empirical_ntk_matches_the_jvp_vjp_kernel(small_lm):
    """Per-window gradients (vmap of grad) against ntk.empirical_ntk's J_X (J_Z^T e) columns."""
    model = small_lm
    tokens = np.random.default_rng(0).integers(0, 256, (4, 8)).astype(np.int32)
    r = np.random.default_rng(1).standard_normal(256)
    r -= r.mean()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p, window):  # float windows: empirical_ntk builds its one-hot cotangents in the inputs' dtype
        return nnx.merge(graphdef, p, rest)(window[None].astype(jnp.int32))[0, -1] @ jnp.asarray(r, jnp.float32)

    want = np.asarray(jax.jit(lambda p, X: ntk.empirical_ntk(f, p, X))(params, jnp.asarray(tokens, jnp.float32)),
                      np.float64)
    got = ntk.lm_empirical_ntk(model, tokens, r)
    assert got.shape == (4, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
