"""Parameter-holding building blocks shared by the mixers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.ops.norms import rms_norm


class RouterBias(nnx.Variable):
    """MoE selection bias: updated by load balancing, never by the optimizer (not an nnx.Param)."""


def dense(x, kernel, bias=None):
    """x @ kernel (+ bias) accumulated in fp32, returned in x's dtype."""
    y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool = False, std: float = 0.02,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x):
        return dense(x, self.kernel[...], None if self.bias is None else self.bias[...])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)
