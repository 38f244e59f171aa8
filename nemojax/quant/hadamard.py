"""Random Hadamard transform (RHT) for the NVFP4 weight-gradient GEMM: dW = x^T g contracts over
tokens, and applying the same orthogonal H blockwise along the token axis of both operands leaves the
product unchanged, (H x)^T (H g) = x^T H^T H g = x^T g, while spreading a block's outliers over its 16
entries before quantisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg


def random_hadamard(key, n: int = 16):
    """[n, n] fp32 orthogonal matrix S D / sqrt(n): S the Sylvester Hadamard matrix, D a random +-1
    diagonal drawn from `key` (so H H^T = I). n: a power of two."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 or n & (n - 1):
        raise ValueError(f"random_hadamard: n must be a power of two >= 1; got {n!r}")
    signs = jax.random.rademacher(key, (n,), dtype=jnp.float32)
    return jnp.asarray(scipy.linalg.hadamard(n), jnp.float32) * signs / np.sqrt(np.float32(n))


def hadamard_transform(x, h, *, axis: int = -1):
    """Multiply every consecutive run of n = h.shape[0] entries of x along `axis` by h (block-diagonal
    H applied along that axis), in fp32 at full matmul precision (no TF32), returned in x's dtype.
    x.shape[axis] must be a multiple of n: padding would change the shape the caller contracts over."""
    x = jnp.asarray(x)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hadamard_transform: h must be a square matrix; got shape {h.shape}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"hadamard_transform: axis must be in [-{x.ndim}, {x.ndim}); got {axis}")
    n = h.shape[0]
    if x.shape[axis] % n:
        raise ValueError(f"hadamard_transform: x.shape[{axis}] = {x.shape[axis]} must be a multiple of "
                         f"the Hadamard size {n}")
    moved = jnp.moveaxis(x, axis, -1).astype(jnp.float32)
    blocks = moved.reshape(moved.shape[:-1] + (-1, n))
    out = jnp.einsum("...bj,ij->...bi", blocks, h.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(out.reshape(moved.shape), -1, axis).astype(x.dtype)
