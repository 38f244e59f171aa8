"""Parameter-holding building blocks shared by the mixers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.ops.norms import rms_norm
from nemojax.quant.linear import quantized_matmul


class _Keep:
    def __repr__(self):
        return "KEEP"


KEEP = _Keep()  # the default of `configure_*` arguments: not given, so that setting is left as it is


class CorrectionBias(nnx.Variable):
    """MoE selection bias: updated by load balancing, never by the optimizer (not an nnx.Param)."""


def dense_fp32(x, kernel, bias=None, precision=None, key=None):
    """x @ kernel (+ bias) accumulated and returned in fp32. With a `precision`
    (`nemojax.quant.linear.Precision`) the matmul and its two gradients run on quantised operands
    (`quantized_matmul`, whose backward takes `key`)."""
    kernel = kernel.astype(x.dtype)
    y = (jnp.einsum("...i,io->...o", x, kernel, preferred_element_type=jnp.float32) if precision is None
         else quantized_matmul(x, kernel, precision, key))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


def dense(x, kernel, bias=None):
    """x @ kernel (+ bias) accumulated in fp32, returned in x's dtype."""
    return dense_fp32(x, kernel, bias).astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, std: float, bias: bool = False, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None
        # low-precision training (`nemojax.quant.training.configure_precision`): a Precision, and the key of
        # its backward's randomness, set for every step (`set_rounding_keys`)
        self.precision = None
        self.rounding_key = None

    def fp32(self, x):
        """The layer's output before the cast to x's dtype."""
        return dense_fp32(x, self.kernel[...], None if self.bias is None else self.bias[...], self.precision,
                          self.rounding_key)

    def __call__(self, x):
        return self.fp32(x).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


class Stateless:
    """Mixin for mixers that keep nothing between calls (no decode cache)."""

    def init_cache(self, batch: int, max_len: int, *, dtype, ssm_dtype):
        return None


class LinearMixer(Stateless, nnx.Module):
    """The linear layer kind's mixer: one d -> d map (a Puzzle replacement for attention, MLP or Mamba)."""

    def __init__(self, spec, hidden: int, *, std: float, dtype, rngs: nnx.Rngs):
        self.linear = Linear(hidden, hidden, bias=spec.bias, std=std, dtype=dtype, rngs=rngs)

    def __call__(self, x, cache=None, pos=0):
        return self.linear(x), cache
