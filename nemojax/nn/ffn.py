"""Feed-forward mixers: the dense relu^2 MLP ('-') and the sigmoid-routed MoE ('E')."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import MLPSpec, MoESpec
from nemojax.nn.layers import Linear, RouterBias
from nemojax.ops.ffn import relu2_ffn
from nemojax.ops.moe import moe_ffn, route


class MLP(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, *, bias: bool = False, out_std: float, dtype,
                 rngs: nnx.Rngs):
        self.up_proj = Linear(hidden, intermediate, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate, hidden, bias=bias, std=out_std, dtype=dtype, rngs=rngs)

    @classmethod
    def from_spec(cls, spec: MLPSpec, hidden: int, **kw) -> "MLP":
        return cls(hidden, spec.intermediate_size, bias=spec.bias, **kw)

    def __call__(self, x, cache=None):
        up, down = self.up_proj, self.down_proj
        y = relu2_ffn(x, up.kernel[...], down.kernel[...],
                      None if up.bias is None else up.bias[...], None if down.bias is None else down.bias[...])
        return y, cache


class MoE(nnx.Module):
    """y = fc2_latent(sum_k w_k expert_k(fc1_latent(x))) + shared(x).

    The router and the shared expert read the full-width x; with `latent_size` set (LatentMoE)
    the routed experts live entirely in the latent width between the two projections.
    """

    def __init__(self, spec: MoESpec, hidden: int, *, out_std: float, dtype, rngs: nnx.Rngs,
                 implementation: str | None = None):
        self.spec, self.implementation = spec, implementation
        e, f = spec.num_experts, spec.intermediate_size
        d_in = spec.latent_size or hidden
        self.gate_weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), (hidden, e), dtype))
        self.e_score_correction_bias = RouterBias(jnp.zeros((e,), jnp.float32))
        self.up_proj = nnx.Param(0.02 * jax.random.normal(rngs.params(), (e, d_in, f), dtype))
        self.down_proj = nnx.Param(out_std * jax.random.normal(rngs.params(), (e, f, d_in), dtype))
        lat = spec.latent_size
        self.fc1_latent_proj = Linear(hidden, lat, bias=spec.bias, dtype=dtype, rngs=rngs) if lat else None
        self.fc2_latent_proj = (Linear(lat, hidden, bias=spec.bias, std=out_std, dtype=dtype, rngs=rngs)
                                if lat else None)
        self.shared_experts = (MLP(hidden, spec.shared_intermediate_size, bias=spec.bias, out_std=out_std,
                                   dtype=dtype, rngs=rngs) if spec.shared_intermediate_size else None)

    def router_logits(self, x_TD):
        return jnp.dot(x_TD.astype(jnp.float32), self.gate_weight[...].astype(jnp.float32))

    def __call__(self, x, cache=None):
        s = self.spec
        x_TD = x.reshape(-1, x.shape[-1])
        weights, indices = route(self.router_logits(x_TD), self.e_score_correction_bias[...], top_k=s.top_k,
                                 n_group=s.n_group, topk_group=s.topk_group, norm_topk_prob=s.norm_topk_prob,
                                 routed_scaling_factor=s.routed_scaling_factor)
        h = x_TD if self.fc1_latent_proj is None else self.fc1_latent_proj(x_TD)
        y = moe_ffn(h, weights, indices, self.up_proj[...], self.down_proj[...], implementation=self.implementation)
        if self.fc2_latent_proj is not None:
            y = self.fc2_latent_proj(y)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TD)[0]
        return y.reshape(x.shape), cache
