"""Mamba-2 mixer (the 'M' layer of Nemotron-H)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import MambaSpec
from nemojax.nn.layers import Linear
from nemojax.ops import ssd
from nemojax.ops.conv import causal_conv1d
from nemojax.ops.norms import gated_rms_norm


class Mamba2Mixer(nnx.Module):
    """in_proj -> [z | xBC | dt]; xBC -> causal conv -> silu -> (x, B, C); SSD; gated RMSNorm(y, z); out_proj."""

    def __init__(self, spec: MambaSpec, hidden: int, *, eps: float, std: float, out_std: float, dtype,
                 rngs: nnx.Rngs):
        self.spec, self.eps = spec, eps
        self.implementation: str | None = None  # `ops.ssd.ssd`'s switch: None | "xla" | "pallas" | "sequential"
        h, k = spec.num_heads, spec.conv_kernel
        self.in_proj = Linear(hidden, spec.d_inner + spec.conv_dim + h, bias=spec.proj_bias, std=std, dtype=dtype,
                              rngs=rngs)
        bound = 1.0 / math.sqrt(k)  # torch Conv1d's default fan-in bound for a depthwise kernel
        self.conv_weight = nnx.Param(jax.random.uniform(rngs.params(), (k, spec.conv_dim), dtype, -bound, bound))
        self.conv_bias = nnx.Param(jnp.zeros((spec.conv_dim,), dtype)) if spec.conv_bias else None
        # dt ~ log-uniform[1e-3, 1e-1] through the inverse softplus; A = -[1..H] (S4D-real); D = 1.
        dt = jnp.exp(jax.random.uniform(rngs.params(), (h,), jnp.float32, math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(dtype))
        self.A_log = nnx.Param(jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)).astype(dtype))
        self.D = nnx.Param(jnp.ones((h,), dtype))
        self.norm_weight = nnx.Param(jnp.ones((spec.d_inner,), dtype))
        self.out_proj = Linear(spec.d_inner, hidden, bias=spec.proj_bias, std=out_std, dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, *, dtype, ssm_dtype):
        s = self.spec
        return {
            "conv": jnp.zeros((batch, s.conv_kernel - 1, s.conv_dim), dtype),
            "ssm": jnp.zeros((batch, s.num_heads, s.head_dim, s.state_size), ssm_dtype),
        }

    def __call__(self, u, cache=None, pos=0):
        s = self.spec
        b, l, _ = u.shape
        gn = s.n_groups * s.state_size
        z, xBC, dt = jnp.split(self.in_proj(u), [s.d_inner, s.d_inner + s.conv_dim], axis=-1)
        conv_bias = None if self.conv_bias is None else self.conv_bias[...]
        xBC, conv_state = causal_conv1d(xBC, self.conv_weight[...], conv_bias,
                                        state=None if cache is None else cache["conv"])
        x, B, C = jnp.split(jax.nn.silu(xBC), [s.d_inner, s.d_inner + gn], axis=-1)
        dt = jnp.clip(jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)), *s.dt_limit)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        D = self.D[...].astype(jnp.float32)
        x = x.reshape(b, l, s.num_heads, s.head_dim)
        B = B.reshape(b, l, s.n_groups, s.state_size)
        C = C.reshape(b, l, s.n_groups, s.state_size)
        if cache is not None and l == 1:  # decode: one recurrence step, cost independent of the context
            y, state = ssd.ssd_step(cache["ssm"].astype(jnp.float32), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=D)
            y = y[:, None]
        else:
            init = None if cache is None else cache["ssm"].astype(jnp.float32)
            y, state = ssd.ssd(x, dt, A, B, C, chunk_size=s.chunk_size, D=D, initial_state=init,
                               implementation=self.implementation)
        y = gated_rms_norm(y.reshape(b, l, s.d_inner), z, self.norm_weight[...],
                           group_size=s.d_inner // s.n_groups, eps=self.eps)
        new_cache = None if cache is None else {"conv": conv_state, "ssm": state.astype(cache["ssm"].dtype)}
        return self.out_proj(y.astype(u.dtype)), new_cache
