"""The non-gated squared-ReLU FFN of Nemotron (dense MLP, shared and routed experts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def relu2(x):
    return jnp.square(jax.nn.relu(x))


def relu2_ffn(x, w_up, w_down, b_up=None, b_down=None):
    """down(relu(up(x))^2); w_up [D, F], w_down [F, D]; fp32 accumulation, result in x's dtype."""
    h = jnp.einsum("...d,df->...f", x, w_up.astype(x.dtype), preferred_element_type=jnp.float32)
    if b_up is not None:
        h = h + b_up.astype(jnp.float32)
    h = relu2(h).astype(x.dtype)
    y = jnp.einsum("...f,fd->...d", h, w_down.astype(x.dtype), preferred_element_type=jnp.float32)
    if b_down is not None:
        y = y + b_down.astype(jnp.float32)
    return y.astype(x.dtype)
