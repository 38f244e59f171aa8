"""Pallas grouped matmul (interpret mode on the CPU) against a per-group NumPy loop in float64 and
`jax.lax.ragged_dot`, forward and gradients, plus a lowering of every kernel to Triton IR for CUDA.

Shapes are ragged on purpose: M, K, N are not multiples of the 16/16/32 blocks, so grids have
several blocks and every edge is masked."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.ops.moe.pallas_gmm import GmmConfig, gmm, group_metadata, tgmm
from testutils import rel_l2

M, K, N, G = 100, 40, 48, 7
BLOCKS = GmmConfig(block_m=16, block_k=16, block_n=32)
GROUP_SIZES = {
    # empty first, middle and last groups; sizes not multiples of 16; rows 0..15 span groups
    # 1, 2, 3 and 5; 28 rows past sum(group_sizes)
    "empty_first_middle_last": [0, 5, 3, 4, 0, 60, 0],
    "exactly_full": [10, 20, 14, 16, 15, 13, 12],
    "one_group": [0, 0, 0, 0, 0, 0, 100],
    "all_empty": [0] * 7,
    "tile_aligned": [16, 32, 0, 16, 0, 16, 20],
}


def np_gmm(lhs, rhs, sizes):
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, s in enumerate(sizes):
        out[start:start + s] = lhs[start:start + s] @ rhs[g]
        start += s
    return out


def np_grads(lhs, rhs, sizes, ct):
    """dlhs[r] = ct[r] rhs[g(r)]^T for rows in a group (0 past them); drhs[g] = lhs_g^T ct_g."""
    lhs, rhs, ct = (np.asarray(a, np.float64) for a in (lhs, rhs, ct))
    dlhs, drhs = np.zeros_like(lhs), np.zeros_like(rhs)
    start = 0
    for g, s in enumerate(sizes):
        rows = slice(start, start + s)
        dlhs[rows] = ct[rows] @ rhs[g].T
        drhs[g] = lhs[rows].T @ ct[rows]
        start += s
    return dlhs, drhs


def inputs(dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(k[0], (M, K), jnp.float32).astype(dtype)
    rhs = jax.random.normal(k[1], (G, K, N), jnp.float32).astype(dtype)
    ct = jax.random.normal(k[2], (M, N), jnp.float32)
    return lhs, rhs, ct


@partial(jax.jit, static_argnames="out_dtype")
def pallas_fwd(lhs, rhs, gs, out_dtype=jnp.float32):
    return gmm(lhs, rhs, gs, preferred_element_type=out_dtype, config=BLOCKS)


@jax.jit
def pallas_grads(lhs, rhs, gs, ct):
    return jax.grad(lambda a, b: jnp.sum(gmm(a, b, gs, config=BLOCKS) * ct), argnums=(0, 1))(lhs, rhs)


@jax.jit
def ragged_grads(lhs, rhs, gs, ct):
    f = lambda a, b: jnp.sum(jax.lax.ragged_dot(a, b, gs, preferred_element_type=jnp.float32) * ct)
    return jax.grad(f, argnums=(0, 1))(lhs, rhs)


def test_group_metadata_lists_the_groups_each_row_tile_meets():
    sizes = GROUP_SIZES["empty_first_middle_last"]
    offsets, first, last = (np.asarray(a) for a in group_metadata(jnp.array(sizes), M, 16))
    for i in range(-(-M // 16)):
        rows = set(range(i * 16, min(i * 16 + 16, M)))
        met = [g for g in range(G) if rows & set(range(offsets[g], offsets[g + 1]))]
        assert met == [g for g in range(first[i], last[i]) if sizes[g]], i


@pytest.mark.parametrize("case", GROUP_SIZES)
def test_forward_fp32_matches_numpy_and_ragged_dot(case):
    sizes = GROUP_SIZES[case]
    lhs, rhs, _ = inputs(jnp.float32)
    gs = jnp.array(sizes, jnp.int32)
    out = np.asarray(pallas_fwd(lhs, rhs, gs))
    ref = np_gmm(lhs, rhs, sizes)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    filled = sum(sizes)
    assert np.all(out[filled:] == 0)  # ragged_dot semantics past the filled rows
    rd = jax.lax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(out[:filled], np.asarray(rd)[:filled], rtol=1e-5, atol=1e-4)


def test_forward_bf16():
    sizes = GROUP_SIZES["empty_first_middle_last"]
    lhs, rhs, _ = inputs(jnp.bfloat16, seed=1)
    gs = jnp.array(sizes, jnp.int32)
    # bf16 x bf16 products are exact in fp32, so against the float64 oracle on the same rounded
    # inputs only fp32 summation error remains
    assert rel_l2(pallas_fwd(lhs, rhs, gs), np_gmm(lhs, rhs, sizes)) < 1e-6
    # a bf16 result adds one rounding (relative 2^-9 per element)
    out16 = pallas_fwd(lhs, rhs, gs, out_dtype=jnp.bfloat16)
    assert out16.dtype == jnp.bfloat16
    assert rel_l2(out16, np_gmm(lhs, rhs, sizes)) < 2 ** -8
    # against the fp32 oracle on unrounded inputs: each operand carries a relative rounding error
    # of at most 2^-9 (about 2^-10 rms), so the product is off by ~2^-9.5 rms relative; 1e-2 is 5x that
    lhs32, rhs32, _ = inputs(jnp.float32, seed=1)
    assert rel_l2(pallas_fwd(lhs, rhs, gs), np_gmm(lhs32, rhs32, sizes)) < 1e-2


@pytest.mark.parametrize("case", ["empty_first_middle_last", "exactly_full", "all_empty"])
def test_gradients_fp32_match_numpy_and_ragged_dot(case):
    sizes = GROUP_SIZES[case]
    lhs, rhs, ct = inputs(jnp.float32, seed=2)
    gs = jnp.array(sizes, jnp.int32)
    dlhs, drhs = pallas_grads(lhs, rhs, gs, ct)
    ref_dlhs, ref_drhs = np_grads(lhs, rhs, sizes, ct)
    np.testing.assert_allclose(np.asarray(dlhs), ref_dlhs, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(drhs), ref_drhs, rtol=1e-5, atol=1e-4)
    for g, s in enumerate(sizes):
        if s == 0:
            assert np.all(np.asarray(drhs[g]) == 0)  # tgmm writes empty groups (no stale memory)
    rd_dlhs, rd_drhs = ragged_grads(lhs, rhs, gs, ct)
    filled = sum(sizes)
    np.testing.assert_allclose(np.asarray(dlhs)[:filled], np.asarray(rd_dlhs)[:filled], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(drhs), np.asarray(rd_drhs), rtol=1e-5, atol=1e-4)


def test_gradients_bf16():
    sizes = GROUP_SIZES["empty_first_middle_last"]
    lhs, rhs, ct = inputs(jnp.bfloat16, seed=3)
    dlhs, drhs = pallas_grads(lhs, rhs, jnp.array(sizes, jnp.int32), ct)
    assert dlhs.dtype == drhs.dtype == jnp.bfloat16
    ref_dlhs, ref_drhs = np_grads(lhs, rhs, sizes, ct)
    # the fp32 cotangent is rounded to bf16 in the kernel and the result is bf16: two roundings of
    # at most 2^-9 relative each
    assert rel_l2(dlhs, ref_dlhs) < 2 ** -7
    assert rel_l2(drhs, ref_drhs) < 2 ** -7


def test_central_finite_difference():
    sizes = GROUP_SIZES["empty_first_middle_last"]
    lhs, rhs, ct = inputs(jnp.float32, seed=4)
    gs = jnp.array(sizes, jnp.int32)
    k = jax.random.split(jax.random.key(5), 2)
    v_lhs, v_rhs = jax.random.normal(k[0], lhs.shape), jax.random.normal(k[1], rhs.shape)
    dlhs, drhs = pallas_grads(lhs, rhs, gs, ct)
    eps = 0.25  # the loss is linear in each operand: no truncation error, so a large step only
    # shrinks the fp32 rounding of the two loss values relative to their difference
    for which, v, grad in (("lhs", v_lhs, dlhs), ("rhs", v_rhs, drhs)):
        def loss(s):
            a, b = (lhs + s * v, rhs) if which == "lhs" else (lhs, rhs + s * v)
            return float(jnp.sum(pallas_fwd(a, b, gs) * ct))
        fd = (loss(eps) - loss(-eps)) / (2 * eps)
        assert abs(fd - float(jnp.vdot(grad, v))) < 1e-3 * (abs(fd) + 1), which


def test_tgmm_alone_matches_numpy():
    sizes = GROUP_SIZES["tile_aligned"]
    lhs, _, ct = inputs(jnp.float32, seed=6)
    out = tgmm(lhs, ct, jnp.array(sizes, jnp.int32), config=BLOCKS)
    np.testing.assert_allclose(np.asarray(out), np_grads(lhs, np.zeros((G, K, N)), sizes, ct)[1],
                               rtol=1e-5, atol=1e-4)


def test_bad_arguments_name_the_field():
    lhs, rhs, _ = inputs(jnp.float32)
    gs = jnp.zeros((G,), jnp.int32)
    with pytest.raises(ValueError, match="block_m must be a power of 2"):
        GmmConfig(block_m=24)
    with pytest.raises(ValueError, match="block_k must be a power of 2 >= 16"):
        GmmConfig(block_k=8)
    with pytest.raises(ValueError, match="rhs"):
        gmm(lhs, rhs[:, :-1], gs)
    with pytest.raises(ValueError, match="group_sizes"):
        gmm(lhs, rhs, gs[:-1])


def test_kernels_lower_to_triton_for_cuda(triton_modules):
    """Forward, dlhs and drhs kernels at the default blocks and bf16, lowered (not run) for an H100;
    each Triton module passes MLIR's verifier (the fixture)."""
    sds = jax.ShapeDtypeStruct
    f = jax.grad(lambda a, b, g: jnp.sum(gmm(a, b, g, config=GmmConfig(interpret=False))), argnums=(0, 1))
    text = jax.jit(f).trace(sds((384, 192), jnp.bfloat16), sds((8, 192, 160), jnp.bfloat16),
                            sds((8,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    kernels = [line for line in text.splitlines() if "gpu$xla.gpu.triton" in line]
    assert len(kernels) == 3
    for name in ("gmm", "gmm_t", "tgmm"):
        assert any(f'name = "{name}"' in line for line in kernels), name
    assert len(triton_modules) == 3
