"""NumPy reference quantisers written from the format definitions, independent of ml_dtypes and XLA:
the value sets are enumerated from sign/exponent/mantissa bits, rounding is a search over that grid,
and blocks are Python loops over slices (the last one short). Scale arithmetic is fp32, in the order
nemojax.quant documents: scales from amax by true division, elements scaled by multiplying with the
scale's reciprocal."""

from __future__ import annotations

import math

import numpy as np

f32 = np.float32


def minifloat_grid(exp_bits: int, man_bits: int, bias: int, special: str):
    """Non-negative finite values of a sign/exponent/mantissa format, ascending, with each value's
    mantissa LSB (for ties to even). special: "none" (every code finite, E2M1), "fn" (only the all-ones
    code is NaN, E4M3), "ieee" (the top exponent is inf/NaN, E5M2)."""
    values, odd = [], []
    for e in range(2 ** exp_bits):
        for m in range(2 ** man_bits):
            top = e == 2 ** exp_bits - 1
            if (special == "ieee" and top) or (special == "fn" and top and m == 2 ** man_bits - 1):
                continue
            frac = m / 2 ** man_bits
            values.append(frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))
            odd.append(m & 1)
    order = np.argsort(values)
    return np.asarray(values)[order], np.asarray(odd, bool)[order]


E2M1 = minifloat_grid(2, 1, 1, "none")
E4M3 = minifloat_grid(4, 3, 7, "fn")
E5M2 = minifloat_grid(5, 2, 15, "ieee")


def neighbours(a, grid):
    """(largest grid value <= a, smallest grid value >= a) for 0 <= a <= grid max, as indices."""
    values, _ = grid
    hi = np.searchsorted(values, a, side="left")
    lo = np.where(values[hi] == a, hi, hi - 1)
    return lo, hi


def round_nearest_even(y, grid):
    """Finite y -> nearest grid value (saturating at the max), ties to the even mantissa; float64."""
    values, odd = grid
    y = np.asarray(y, np.float64)
    a = np.minimum(np.abs(y), values[-1])
    lo, hi = neighbours(a, grid)
    d_lo, d_hi = a - values[lo], values[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ~odd[hi])
    return np.sign(y) * values[np.where(pick_hi, hi, lo)]


def fp8(x, grid, has_inf: bool):
    """Per-tensor current scaling: scale = amax(finite) / max (1 for amax 0); NaN stays NaN, inf stays
    inf when the format has it, else NaN."""
    x = np.asarray(x, f32)
    finite = np.isfinite(x)
    amax = np.max(np.abs(x[finite]), initial=0.0)
    scale = f32(amax / f32(grid[0][-1])) if amax > 0 else f32(1)
    y = np.where(finite, x * (f32(1) / scale), 0).astype(f32)
    out = (round_nearest_even(y, grid).astype(f32) * scale).astype(f32)
    special = np.where(np.isinf(x) & has_inf, x, np.nan)
    return np.where(finite, out, special).astype(f32)


def _nvfp4_block(t, g):
    """One block (any shape) of t = x * (1/g) -> dequantised values."""
    bmax = np.max(np.abs(t))
    if not np.isfinite(bmax):
        return np.full(t.shape, np.nan, f32)
    s = f32(round_nearest_even(f32(bmax * f32(1 / 6)), E4M3))
    if s == 0:
        return np.zeros(t.shape, f32)
    e = round_nearest_even((t * (f32(1) / s)).astype(f32), E2M1).astype(f32)
    return ((e * s).astype(f32) * g).astype(f32)


def _nvfp4_global(x):
    finite = np.isfinite(x)
    amax = np.max(np.abs(x[finite]), initial=0.0)
    return f32(amax / f32(6 * 448)) if amax > 0 else f32(1)


def nvfp4_rows(x):
    """NVFP4 with 1x16 blocks along the last axis of a 2D array."""
    x = np.asarray(x, f32)
    g = _nvfp4_global(x)
    t = (x * (f32(1) / g)).astype(f32)
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for c in range(0, x.shape[1], 16):
            out[r, c:c + 16] = _nvfp4_block(t[r, c:c + 16], g)
    return out


def nvfp4_tiles(x):
    """NVFP4 with 16x16 tiles over a 2D array."""
    x = np.asarray(x, f32)
    g = _nvfp4_global(x)
    t = (x * (f32(1) / g)).astype(f32)
    out = np.empty_like(x)
    for r in range(0, x.shape[0], 16):
        for c in range(0, x.shape[1], 16):
            out[r:r + 16, c:c + 16] = _nvfp4_block(t[r:r + 16, c:c + 16], g)
    return out


def mxfp4_rows(x):
    """MXFP4 with 32-element blocks along the last axis of a 2D array: scale 2^(floor(log2 amax) - 2)."""
    x = np.asarray(x, f32)
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for c in range(0, x.shape[1], 32):
            b = x[r, c:c + 32]
            bmax = float(np.max(np.abs(b)))
            if not math.isfinite(bmax):
                out[r, c:c + 32] = np.nan
                continue
            exponent = math.frexp(bmax)[1] - 1 - 2 if bmax > 0 else 0
            scale = f32(2.0 ** max(exponent, -126))
            out[r, c:c + 32] = round_nearest_even(b / scale, E2M1).astype(f32) * scale
    return out
