"""Quantise-dequantise ("fake quantisation") to FP8 (E4M3, E5M2), NVFP4 and MXFP4, in fp32 math.

Each format is an element value set (ml_dtypes' float8_e4m3fn, float8_e5m2, float4_e2m1fn) times a
scale: one per tensor for FP8 ("current scaling", scale = amax / format max); for NVFP4 one E4M3 scale
per 16-element block under an fp32 per-tensor scale; for MXFP4 one power-of-two (E8M0) scale per
32-element block (OCP Microscaling spec v1.0). The result holds the dequantised values, so a matmul on
it is the matmul a low-precision GEMM computes, up to accumulation order.

Non-finite inputs follow the value sets: the per-tensor amax is taken over finite values only, so one
inf or NaN does not poison the whole tensor. FP8: NaN stays NaN; inf stays inf in E5M2 and becomes NaN
in E4M3 (which has no infinities). NVFP4/MXFP4: E2M1 has neither NaN nor inf, so a block holding one
gets the NaN scale (E4M3 and E8M0 both encode NaN) and dequantises to NaN entirely; other blocks are
unaffected. fp32 subnormals are out of range: XLA flushes them to zero on CPU and GPU.

Arithmetic (fp32, the same eager, under jit and under vmap): per-tensor scales are amax / constant by
true division; elements are scaled by multiplying with the scale's reciprocal, as the hardware recipes
do; dequantised values are code * scale.
"""

from __future__ import annotations

import operator
from functools import partial

import jax
import jax.numpy as jnp

E2M1 = jnp.float4_e2m1fn
E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
_WITH_INF = (E5M2,)  # of these element types, the only one that encodes +-inf

_FP8 = {"fp8_e4m3": E4M3, "fp8_e5m2": E5M2}
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
_E2M1_EMAX = 2  # floor(log2(6)): the OCP MX spec's emax_elem for FP4 (E2M1)
ROUNDINGS = ("nearest", "stochastic")


def _fmax(element) -> float:
    return float(jnp.finfo(element).max)


# --- elements ---------------------------------------------------------------------------------------

def _round_nearest(y, element, key):
    del key  # deterministic
    return y.astype(element).astype(jnp.float32)  # XLA's conversion: round to nearest, ties to even


def _round_stochastic(y, element, key):
    """Round |y| (finite, at most the format max) up to the next representable value with probability
    (|y| - lower) / spacing, else down: unbiased, and only ever one of the two neighbours."""
    info = jnp.finfo(element)
    _, e = jnp.frexp(y)  # |y| = m 2^e with m in [0.5, 1), so |y| lies in the binade [2^(e-1), 2^e)
    # subnormals share the spacing of the lowest normal binade
    spacing = jnp.ldexp(jnp.float32(1), jnp.maximum(e - 1, info.minexp) - info.nmant)
    steps = jnp.abs(y) / spacing  # exact: division by a power of two
    lower = jnp.floor(steps)
    up = jax.random.uniform(key, y.shape) < steps - lower
    return jnp.copysign((lower + up) * spacing, y)


_ROUNDERS = {"nearest": _round_nearest, "stochastic": _round_stochastic}


def _round_to_element(y, element, rounding="nearest", key=None):
    """fp32 y, already in the element format's units -> a value of `element` (E2M1, E4M3 or E5M2), as
    fp32. Finite values saturate at the format's max; NaN stays NaN; +-inf stays +-inf where the format
    has infinities (E5M2) and becomes NaN where it has none."""
    finite = jnp.isfinite(y)
    saturated = jnp.clip(jnp.where(finite, y, 0.0), -_fmax(element), _fmax(element))
    rounded = _ROUNDERS[rounding](saturated, element, key)
    special = y if element in _WITH_INF else jnp.full_like(y, jnp.nan)
    return jnp.where(finite, rounded, special)


# --- scales -----------------------------------------------------------------------------------------

def _finite_amax(x):
    return jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0))


def _exact_div(a, b: float):
    """a / b correctly rounded under jit and vmap too. XLA turns a division by a constant or by a
    broadcast into a multiplication by the rounded reciprocal, but only true division makes the per-tensor
    scale a fixed point (amax -> s = amax / b -> new amax b * s -> s again), which quantise-twice-equals-
    once needs. The barrier hides the divisor from that rewrite; deriving it from `a` (finite here) gives it
    a's shape, batch axes included, so no broadcast is left to rewrite."""
    return a / jax.lax.optimization_barrier(a * 0 + b)


def _amax_scale(amax, top: float):
    """amax / top, the scale that maps amax to the largest code; 1 for amax 0 (an all-zero tensor)."""
    return jnp.where(amax > 0, _exact_div(amax, top), 1.0).astype(jnp.float32)


def _reciprocal(scale):
    """1 / scale, and 0 for a zero scale (a block that flushed to zero stays zero). Elements are scaled
    by multiplying with it, as the hardware recipes do (and as XLA would rewrite a division anyway)."""
    return jnp.where(scale == 0, 0.0, 1.0 / scale)


def fp8_scale(amax, fmt: str = "fp8_e4m3"):
    """The current/calibrated FP8 scale amax / format max (448 for "fp8_e4m3", 57344 for "fp8_e5m2");
    1 where amax is 0. amax: an fp32 scalar or array (one scale per entry)."""
    return _amax_scale(jnp.asarray(amax, jnp.float32), _fmax(_lookup_fp8(fmt)))


def encode_fp8(x, scale, fmt: str = "fp8_e4m3"):
    """x * (1 / scale) rounded to nearest (ties to even), saturating at the format max, stored in the
    FP8 dtype (jnp.float8_e4m3fn or jnp.float8_e5m2): what an FP8 cache or GEMM operand holds. scale
    (> 0, fp32) broadcasts against x. NaN/inf as in the module docstring."""
    element = _lookup_fp8(fmt)
    inverse = 1.0 / jnp.asarray(scale, jnp.float32)
    return _round_to_element(x.astype(jnp.float32) * inverse, element).astype(element)


def decode_fp8(codes, scale, dtype=jnp.float32):
    """codes * scale in fp32, cast to `dtype`: the inverse of encode_fp8 on its value set."""
    return (codes.astype(jnp.float32) * scale).astype(dtype)


def _lookup_fp8(fmt):
    if fmt not in _FP8:
        raise ValueError(f"fmt must be one of {tuple(_FP8)}; got {fmt!r}")
    return _FP8[fmt]


# --- blocks -----------------------------------------------------------------------------------------

def _blockwise(fn, x, axes: tuple[int, ...], size: int):
    """fn(blocks, within) on x cut into blocks of `size` along each of `axes` (one axis: 1 x size blocks;
    two: size x size tiles), where `within` are the axes of `blocks` that run inside one block. A length
    that is not a multiple of `size` is zero-padded (zeros change no block's amax) and cut back after."""
    last = tuple(range(-len(axes), 0))
    moved = jnp.moveaxis(x, axes, last)
    k = moved.ndim - len(axes)
    lengths = moved.shape[k:]
    padded = jnp.pad(moved, [(0, 0)] * k + [(0, -n % size) for n in lengths])
    blocks = padded.reshape(padded.shape[:k] + tuple(d for n in padded.shape[k:] for d in (n // size, size)))
    within = tuple(range(k + 1, blocks.ndim, 2))
    out = fn(blocks, within).reshape(padded.shape)[(...,) + tuple(slice(n) for n in lengths)]
    return jnp.moveaxis(out, last, axes)


def _block_amax(blocks, within):
    return jnp.max(jnp.abs(blocks), within, keepdims=True)  # NaN and inf propagate into the block scale


# --- formats: fp32 x -> fp32 dequantised values -----------------------------------------------------

def _fp8(x, axes, rounding, key, amax, *, element):
    del axes  # one scale for the whole tensor
    scale = _amax_scale(amax, _fmax(element))
    return _round_to_element(x * _reciprocal(scale), element, rounding, key) * scale


def _nvfp4(x, axes, rounding, key, amax):
    """Two-level scaling, in this fp32 arithmetic: the tensor scale g = amax / (6 * 448) (correctly
    rounded) and t = x * (1/g), so every block scale s = E4M3(max|t_block| * (1/6)) is at most 448;
    elements E2M1(t * (1/s)); value (E2M1 * s) * g. A block whose scale underflows E4M3
    (max|t_block| < 6 * 2^-10) is all zeros."""
    g = _amax_scale(amax, _fmax(E2M1) * _fmax(E4M3))

    def per_block(t, within):
        s = _round_to_element(_block_amax(t, within) * (1 / _fmax(E2M1)), E4M3)
        return _round_to_element(t * _reciprocal(s), E2M1, rounding, key) * s

    return _blockwise(per_block, x * _reciprocal(g), axes, NVFP4_BLOCK) * g


def _mxfp4(x, axes, rounding, key, amax):
    """Scale 2^(floor(log2 max|x_block|) - 2) per block (OCP MX v1.0, emax_elem = 2 for E2M1), so the
    block max lands in [4, 8) and values above 6 saturate to 6; elements E2M1(x / scale)."""
    del amax  # no tensor scale

    def per_block(b, within):
        amax = _block_amax(b, within)
        _, e = jnp.frexp(amax)  # floor(log2 amax) = e - 1 exactly (jnp.log2 can round up to the next integer)
        # E8M0 reaches 2^-127, fp32 normals (XLA flushes subnormals) stop at 2^-126
        exponent = jnp.maximum(e - 1 - _E2M1_EMAX, jnp.finfo(jnp.float32).minexp)
        scale = jnp.where(jnp.isfinite(amax), jnp.ldexp(jnp.float32(1), exponent), jnp.nan)  # E8M0's NaN code
        return _round_to_element(b * _reciprocal(scale), E2M1, rounding, key) * scale  # exact: powers of two

    return _blockwise(per_block, x, axes, MXFP4_BLOCK)


_QUANTIZERS = {
    "fp8_e4m3": partial(_fp8, element=E4M3),
    "fp8_e5m2": partial(_fp8, element=E5M2),
    "nvfp4": _nvfp4,
    "mxfp4": _mxfp4,
}
FORMATS = tuple(_QUANTIZERS)


# --- public entry -----------------------------------------------------------------------------------

def quantize(x, fmt: str, *, axis=-1, rounding: str = "nearest", key=None):
    """Quantise-dequantise x to `fmt`; returns an array of x's shape and dtype holding values of the
    format (element times scale). Math in fp32; for a bf16/fp16 x the final cast to x's dtype rounds
    the dequantised value once (exact for fp32 x).

    fmt:
      "fp8_e4m3", "fp8_e5m2": per-tensor current scaling, scale = amax / 448 (E4M3) or / 57344 (E5M2),
        1 for an all-zero tensor; the result does not depend on `axis` (which is still validated).
      "nvfp4": E2M1 elements (+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}) in 16-element blocks, each with an E4M3
        scale, under an fp32 per-tensor scale amax / (6 * 448) (see _nvfp4 for the arithmetic).
      "mxfp4": E2M1 elements in 32-element blocks with a power-of-two (E8M0) scale, OCP MX v1.0.
    axis: the axis the blocks run along (int), or a pair of axes for square 2D blocks over them (16x16
      for nvfp4, 32x32 for mxfp4): quantize(w, "nvfp4", axis=(-2, -1)) gives a weight whose transpose is
      the quantised transpose, so the forward and the transposed backward GEMM see the same weight. A
      length that is not a multiple of the block is padded with zeros internally and cut back.
    rounding: "nearest" (ties to even) or "stochastic" (needs `key`; rounds up to the upper of the two
      neighbouring representable values with probability proportional to the distance from the lower
      one, so the expectation is the input). Scales are always rounded to nearest.
    Values beyond a format's max saturate (only possible after a scale rounds down, e.g. NVFP4's E4M3
    block scale or MXFP4's floor). NaN and inf: see the module docstring.

    The per-tensor scale covers all of x; under jax.vmap each slice gets its own (e.g. one per expert of
    a stacked weight). Quantising the result again returns it bitwise unchanged, except NVFP4 blocks
    whose E4M3 scale is subnormal (block amax below 2^-6 / 448, about 3.5e-5, of the tensor amax).

    Backward: straight-through (custom_vjp): the cotangent passes to x unchanged; key gets none.
    """
    _check_args(fmt, rounding, key)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantize: x must be a floating-point array; got dtype {x.dtype}")
    return _compiled(fmt, _normalize_axes(axis, x.ndim), rounding, x, key)


def _check_args(fmt, rounding, key) -> None:
    if not isinstance(fmt, str) or fmt not in _QUANTIZERS:
        raise ValueError(f"quantize: fmt must be one of {FORMATS}; got {fmt!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"quantize: rounding must be one of {ROUNDINGS}; got {rounding!r}")
    if (rounding == "stochastic") != (key is not None):
        raise ValueError(f"quantize: key must be given exactly when rounding='stochastic'; "
                         f"got rounding={rounding!r}, key={'None' if key is None else 'given'}")


def _normalize_axes(axis, ndim: int) -> tuple[int, ...]:
    """An int axis, or a pair of distinct axes, as a tuple of non-negative ints; ValueError otherwise."""
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    ok = 1 <= len(axes) <= 2 and all(not isinstance(a, bool) and hasattr(a, "__index__") for a in axes)
    if ok:
        axes = tuple(operator.index(a) for a in axes)
        ok = all(-ndim <= a < ndim for a in axes)
        axes = tuple(a % ndim for a in axes) if ok else axes
        ok = ok and len(set(axes)) == len(axes)
    if not ok:
        raise ValueError(f"quantize: axis must be an int in [-{ndim}, {ndim}) or a pair of distinct such ints "
                         f"(x has {ndim} dims); got {axis!r}")
    return axes


def quantize_groups(x, fmt: str, group_sizes, *, axis: int = -1, rounding: str = "nearest", key=None):
    """`quantize` of each group of consecutive rows of x [R, C] as a tensor of its own, in one call: the
    rows of a grouped GEMM's operand (a routed expert's tokens), each group with its own per-tensor
    scale. group_sizes: int [G], the rows of each group in order; rows past their sum form one more group.

    axis: -1 or 1, blocks along each row (C, the features); 0, blocks down the rows (the tokens, as a
    weight-gradient GEMM contracts them), which never straddle two groups when every group size is a
    multiple of the format's block (16 for nvfp4, 32 for mxfp4). That alignment is the caller's to keep
    (the sizes are traced); with it, each group quantises exactly as quantize(x[start:end], ...) would.
    rounding, key: as in `quantize` (stochastic rounding draws over the whole [R, C])."""
    _check_args(fmt, rounding, key)
    x, group_sizes = jnp.asarray(x), jnp.asarray(group_sizes)
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantize_groups: x must be a floating-point [R, C] array; got {x.dtype} {x.shape}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"quantize_groups: group_sizes must be a 1-D integer array; got {group_sizes.dtype} "
                         f"{group_sizes.shape}")
    if isinstance(axis, bool) or axis not in (-1, 0, 1):
        raise ValueError(f"quantize_groups: axis must be -1, 0 or 1; got {axis!r}")
    return _compiled(fmt, (axis % 2,), rounding, x, key, group_sizes)


def _group_amax(x, group_sizes):
    """[R, 1]: each row's group's finite amax (x [R, C], groups of consecutive rows)."""
    group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(x.shape[0]), side="right")
    rows = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0), axis=1)
    return jax.ops.segment_max(rows, group, num_segments=group_sizes.shape[0] + 1)[group][:, None]


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _straight_through(fmt, axes, rounding, x, key, group_sizes=None):
    x32 = x.astype(jnp.float32)
    amax = _finite_amax(x32) if group_sizes is None else _group_amax(x32, group_sizes)
    return _QUANTIZERS[fmt](x32, axes, rounding, key, amax).astype(x.dtype)


def _straight_through_fwd(fmt, axes, rounding, x, key, group_sizes=None):
    return _straight_through(fmt, axes, rounding, x, key, group_sizes), None


def _straight_through_bwd(fmt, axes, rounding, residuals, g):
    del fmt, axes, rounding, residuals
    return g, None, None


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)
# one compiled program per (fmt, axes, rounding, shape) instead of a few dozen eager ops; inside an
# outer jit it is inlined
_compiled = jax.jit(_straight_through, static_argnums=(0, 1, 2))
