"""Parameter-holding building blocks shared by the mixers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.ops.norms import rms_norm


class _Keep:
    def __repr__(self):
        return "KEEP"


KEEP = _Keep()  # the default of `configure_*` arguments: not given, so that setting is left as it is


class CorrectionBias(nnx.Variable):
    """MoE selection bias: updated by load balancing, never by the optimizer (not an nnx.Param)."""


def dense(x, kernel, bias=None):
    """x @ kernel (+ bias) accumulated in fp32, returned in x's dtype."""
    y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, std: float, bias: bool = False, dtype=jnp.float32,
                 rngs: nnx.Rngs):
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
