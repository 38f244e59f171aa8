"""quantize / encode_fp8 against the NumPy reference of quant_reference.py (value sets enumerated from
their bits, rounding by grid search, blocks by Python loops)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quant_reference as ref
from nemojax.quant import FORMATS, decode_fp8, encode_fp8, fp8_scale, quantize

f32 = np.float32
GRIDS = {"fp8_e4m3": ref.E4M3, "fp8_e5m2": ref.E5M2}


def reference(x, fmt):
    """Reference quantisation of a 2D x with blocks along the last axis."""
    if fmt in GRIDS:
        return ref.fp8(x, GRIDS[fmt], has_inf=fmt == "fp8_e5m2")
    return {"nvfp4": ref.nvfp4_rows, "mxfp4": ref.mxfp4_rows}[fmt](x)


def wide_range(shape, seed, decades=3.0):
    """Normal samples times log-uniform magnitudes over `decades` decades, with one all-zero 32-block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-decades / 2, decades / 2, shape)
    x[0, :32] = 0.0
    return x.astype(f32)


def assert_same(actual, expected):
    np.testing.assert_array_equal(np.asarray(actual), expected)  # NaN == NaN here


# --- the reference itself -------------------------------------------------------------------------

def test_reference_value_sets_match_the_specs():
    np.testing.assert_array_equal(ref.E2M1[0], [0, 0.5, 1, 1.5, 2, 3, 4, 6])
    e4m3, e5m2 = ref.E4M3[0], ref.E5M2[0]
    assert (e4m3[-1], e4m3[1], len(e4m3) - 1) == (448, 2.0 ** -9, 126)  # max, min subnormal, # > 0
    assert (e5m2[-1], e5m2[1], len(e5m2) - 1) == (57344, 2.0 ** -16, 123)
    # ties go to the even mantissa: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    np.testing.assert_array_equal(ref.round_nearest_even(ties, ref.E2M1), [0, 1, 1, 2, 2, 4, 4])
    np.testing.assert_array_equal(ref.round_nearest_even([17, 19, 464, -1e9], ref.E4M3), [16, 20, 448, -448])


# --- nearest rounding against the reference ---------------------------------------------------------

def _midpoints(grid):
    v = grid[0]
    return np.concatenate([v, (v[:-1] + v[1:]) / 2]).astype(f32)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_every_value_and_tie(fmt):
    """With amax = format max the scale is 1, so the input hits every grid value and every midpoint."""
    y = _midpoints(GRIDS[fmt])
    x = np.concatenate([y, -y])[None, :]
    q = np.asarray(quantize(x, fmt))
    assert_same(q, reference(x, fmt))
    on_grid = np.isin(np.abs(q), GRIDS[fmt][0])
    assert on_grid.all()


def test_e2m1_ties_through_both_block_formats():
    """Blocks whose max is 6 * 2^k have exact scales (NVFP4: E4M3 2^k under a global scale of 1,
    MXFP4: 2^k), so every E2M1 midpoint is a tie; MXFP4's block max 7 * 2^k saturates to 6 * 2^k."""
    y = _midpoints(ref.E2M1)  # 15 values, max 6
    blocks = []
    for k in (-2, 0, 3):
        blocks.append(np.concatenate([y, -y, [6.0, 0]]) * 2.0 ** k)  # 32 entries
    x_nv = np.concatenate(blocks + [[6 * 448]])[None, :].astype(f32)  # amax 2688 makes the global scale 1
    assert_same(quantize(x_nv, "nvfp4"), ref.nvfp4_rows(x_nv))
    x_mx = np.concatenate(blocks + [np.full(32, 7.0)])[None, :].astype(f32)
    q = np.asarray(quantize(x_mx, "mxfp4"))
    assert_same(q, ref.mxfp4_rows(x_mx))
    np.testing.assert_array_equal(q[0, -32:], 6.0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(3, 37), (2, 64), (1, 5)])
def test_random_against_reference(fmt, shape):
    x = wide_range(shape, seed=shape[1])
    assert_same(quantize(x, fmt), reference(x, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_axis_moves_the_blocks(fmt):
    x = wide_range((37, 3), seed=1).T.copy()
    assert_same(quantize(x.T, fmt, axis=0), reference(x, fmt).T)
    x3 = wide_range((6, 40), seed=2).reshape(2, 3, 40).transpose(0, 2, 1)  # blocks along axis 1
    expected = reference(x3.transpose(0, 2, 1).reshape(6, 40), fmt).reshape(2, 3, 40).transpose(0, 2, 1)
    assert_same(quantize(x3, fmt, axis=1), expected)


def test_nvfp4_2d_tiles_are_transpose_invariant():
    w = wide_range((40, 23), seed=3)
    q = np.asarray(quantize(w, "nvfp4", axis=(0, 1)))
    assert_same(q, ref.nvfp4_tiles(w))
    assert_same(quantize(w.T, "nvfp4", axis=(-2, -1)), q.T)
    assert_same(quantize(w, "nvfp4", axis=(1, 0)), q)
    # with 1x16 blocks along the contraction axis, the forward (x @ w: blocks along w's axis 0) and the
    # input gradient (g @ w.T: along w's axis 1) see different weights; 16x16 tiles remove that
    assert not np.array_equal(np.asarray(quantize(w, "nvfp4", axis=0)), np.asarray(quantize(w, "nvfp4", axis=1)))


def test_output_keeps_shape_and_dtype():
    x = wide_range((4, 48), seed=4)
    for fmt in FORMATS:
        q = quantize(jnp.asarray(x, jnp.bfloat16), fmt)
        assert q.shape == x.shape and q.dtype == jnp.bfloat16
        expected = quantize(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), fmt).astype(jnp.bfloat16)
        assert_same(q.astype(jnp.float32), np.asarray(expected.astype(jnp.float32)))


# --- zeros, infinities, NaN ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_tensor_gives_zeros(fmt):
    assert_same(quantize(jnp.zeros((2, 40)), fmt), np.zeros((2, 40), f32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_and_inf(fmt):
    """FP8: NaN stays NaN, inf stays inf in E5M2 and becomes NaN in E4M3, finite values scale by the
    finite amax. Block formats: a block holding NaN or inf is all NaN, the others are unaffected."""
    x = wide_range((3, 64), seed=5)
    x[0, 3], x[1, 40], x[2, 7] = np.inf, -np.inf, np.nan
    q = np.asarray(quantize(x, fmt))
    assert_same(q, reference(x, fmt))
    if fmt in GRIDS:
        assert np.isnan(q[2, 7]) and np.isfinite(np.delete(q.ravel(), [3, 64 + 40, 128 + 7])).all()
        assert_same(q[[0, 1], [3, 40]], [np.inf, -np.inf] if fmt == "fp8_e5m2" else [np.nan, np.nan])
    else:
        size = 16 if fmt == "nvfp4" else 32
        bad = np.zeros_like(q, bool)
        bad[0, :size], bad[1, 40 // size * size:][:size], bad[2, :size] = True, True, True
        assert np.isnan(q[bad]).all() and np.isfinite(q[~bad]).all()


# --- idempotence -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("axis", [-1, (0, 1)])
def test_quantize_twice_equals_once(fmt, axis):
    x = wide_range((48, 80), seed=6)
    q = quantize(x, fmt, axis=axis)
    assert_same(quantize(q, fmt, axis=axis), np.asarray(q))


@pytest.mark.parametrize("fmt", FORMATS)
def test_vmap_scales_each_slice_and_stays_idempotent(fmt):
    """Under vmap (e.g. one scale per expert of a stacked weight) each slice gets its own per-tensor
    scale, and the scale stays a fixed point there too (XLA would otherwise turn its division into a
    multiplication by a rounded reciprocal)."""
    w = wide_range((3 * 40, 48), seed=13).reshape(3, 40, 48) * np.array([1e-3, 1.0, 7e2], f32)[:, None, None]
    per_slice = jax.vmap(lambda m: quantize(m, fmt, axis=(0, 1)))
    q = np.asarray(per_slice(w))
    for i in range(3):
        assert_same(q[i], np.asarray(quantize(w[i], fmt, axis=(0, 1))))
    assert_same(per_slice(q), q)


def test_nvfp4_idempotent_except_subnormal_block_scales():
    """Over eight decades some E4M3 block scales are subnormal (block amax < 2^-6 / 448 of the tensor
    amax); only those blocks may move on a second pass, as the docstring says."""
    x = wide_range((64, 160), seed=7, decades=8.0)
    q = np.asarray(quantize(x, "nvfp4"))
    moved = np.asarray(quantize(q, "nvfp4")) != q
    block_amax = np.abs(x).reshape(64, 10, 16).max(-1)
    subnormal = np.repeat(block_amax < np.abs(x).max() * 2.0 ** -6 / 448, 16, axis=1)
    assert subnormal.any()  # the input does reach the corner
    assert not (moved & ~subnormal).any()


# --- stochastic rounding ---------------------------------------------------------------------------

def _stochastic_case(fmt):
    """Input whose scales are exact powers of two times 6 * 448 / 448 etc., so nothing saturates, and
    the reference neighbours (in output units) of each entry. Two blocks, maxima 6 and 6 * 2^-3."""
    rng = np.random.default_rng(8)
    size = {"nvfp4": 16, "mxfp4": 32}.get(fmt, 16)
    blocks = []
    for bmax in (6.0, 0.75):
        b = rng.uniform(-bmax, bmax, size)
        b[0], b[1] = bmax, bmax / 6  # the block max, and an exact grid value (1 * scale)
        blocks.append(b)
    x = np.concatenate(blocks).astype(f32)
    if fmt in GRIDS:
        x[0] = GRIDS[fmt][0][-1]  # amax = format max: scale 1
        scale, grid = np.ones_like(x), GRIDS[fmt]
    else:
        scale, grid = np.repeat([1.0, 0.125], size).astype(f32), ref.E2M1
    if fmt == "nvfp4":
        x[0] = 6 * 448  # amax 2688: global scale 1, first block scale 448
        scale[:size] = 448
    lo, hi = ref.neighbours(np.abs(x / scale), grid)
    sign = np.sign(x)
    return x, sign * grid[0][lo] * scale, sign * grid[0][hi] * scale


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_is_unbiased_between_the_two_neighbours(fmt):
    x, lo, hi = _stochastic_case(fmt)
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: quantize(x, fmt, rounding="stochastic", key=k)))(keys))
    assert ((draws == lo) | (draws == hi)).all()
    p = np.where(hi == lo, 0.0, (x - lo) / np.where(hi == lo, 1, hi - lo))
    # five standard errors of the mean of a two-valued draw, plus fp32 slack for the scale products
    tol = 5 * np.abs(hi - lo) * np.sqrt(p * (1 - p) / n) + 1e-6 * np.abs(x)
    assert (np.abs(draws.mean(0) - x) <= tol).all()
    assert ((draws == hi).mean(0)[(p > 0.05) & (p < 0.95)] > 0).all()  # both neighbours are drawn
    np.testing.assert_array_equal(draws[:, hi == lo], np.broadcast_to(x[hi == lo], (n, int((hi == lo).sum()))))


def test_stochastic_keys_differ_and_repeat():
    x = wide_range((2, 64), seed=9)
    a, b = (quantize(x, "nvfp4", rounding="stochastic", key=jax.random.key(s)) for s in (0, 1))
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert_same(quantize(x, "nvfp4", rounding="stochastic", key=jax.random.key(0)), np.asarray(a))


# --- straight-through backward ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_straight_through_gradient(fmt, rounding):
    x = wide_range((3, 40), seed=10)
    w = np.random.default_rng(11).standard_normal(x.shape).astype(f32)
    key = jax.random.key(3) if rounding == "stochastic" else None
    axis = (0, 1) if fmt == "nvfp4" else -1
    grad = jax.jit(jax.grad(lambda x: jnp.sum(quantize(x, fmt, axis=axis, rounding=rounding, key=key) * w)))(x)
    np.testing.assert_array_equal(np.asarray(grad), w)


# --- the FP8 pieces for a KV cache ------------------------------------------------------------------

def test_encode_decode_fp8():
    x = wide_range((4, 48), seed=12)
    scale = fp8_scale(np.abs(x).max())
    codes = encode_fp8(x, scale)
    assert codes.dtype == jnp.float8_e4m3fn
    assert_same(decode_fp8(codes, scale), np.asarray(quantize(x, "fp8_e4m3")))
    # scale 1 on values that fit: plain E4M3 rounding; beyond 448 (an uncalibrated cache): saturation
    y = np.array([0.3, -17.0, 100.1, 1000.0, -1e6, np.nan], f32)
    expected = np.where(np.isnan(y), np.nan, ref.round_nearest_even(np.nan_to_num(y), ref.E4M3))
    assert_same(decode_fp8(encode_fp8(y, 1.0), 1.0), expected.astype(f32))
    assert float(fp8_scale(0.0)) == 1.0 and float(fp8_scale(57344.0, "fp8_e5m2")) == 1.0


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(fmt="fp4"), r"fmt must be one of \('fp8_e4m3', 'fp8_e5m2', 'nvfp4', 'mxfp4'\)"),
    (dict(fmt="nvfp4", rounding="up"), r"rounding must be one of \('nearest', 'stochastic'\)"),
    (dict(fmt="nvfp4", rounding="stochastic"), "key must be given exactly when"),
    (dict(fmt="nvfp4", key=jax.random.key(0)), "key must be given exactly when"),
    (dict(fmt="nvfp4", axis=2), r"axis must be an int in \[-2, 2\)"),
    (dict(fmt="nvfp4", axis=(0, -2)), "pair of distinct"),
    (dict(fmt="nvfp4", axis=(0, 1, 1)), "axis must be"),
    (dict(fmt="mxfp4", axis=1.0), "axis must be"),
    (dict(fmt="mxfp4", axis=True), "axis must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(jnp.ones((2, 16)), **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="x must be a floating-point array; got dtype int32"):
        quantize(jnp.ones((2, 16), jnp.int32), "fp8_e4m3")
    for call in (lambda: encode_fp8(jnp.ones(3), 1.0, "nvfp4"), lambda: fp8_scale(1.0, "e4m3")):
        with pytest.raises(ValueError, match=r"fmt must be one of \('fp8_e4m3', 'fp8_e5m2'\)"):
            call()
