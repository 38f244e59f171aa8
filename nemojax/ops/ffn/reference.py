"""The non-gated squared-ReLU FFN of Nemotron (dense MLP, shared and routed experts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def relu2(x):
    return jnp.square(jax.nn.relu(x))


def check_ffn_args(who: str, x, w_up, w_down, b_up=None, b_down=None) -> None:
    """x [..., D], w_up [D, F], w_down [F, D], b_up [F] or None, b_down [D] or None."""
    d = x.shape[-1]
    if w_up.ndim != 2 or w_up.shape[0] != d or w_down.shape != (w_up.shape[1], d):
        raise ValueError(f"{who}: w_up must be [D, F] and w_down [F, D] with D = x.shape[-1] = {d}; "
                         f"got w_up {w_up.shape}, w_down {w_down.shape}")
    f = w_up.shape[1]
    if b_up is not None and b_up.shape != (f,):
        raise ValueError(f"{who}: b_up must be [F] = {(f,)} or None; got {b_up.shape}")
    if b_down is not None and b_down.shape != (d,):
        raise ValueError(f"{who}: b_down must be [D] = {(d,)} or None; got {b_down.shape}")


def relu2_ffn(x, w_up, w_down, b_up=None, b_down=None):
    """down(relu(up(x) + b_up)^2) + b_down; w_up [D, F], w_down [F, D], biases optional ([F], [D]);
    fp32 accumulation, biases added in fp32, result in x's dtype."""
    h = jnp.einsum("...d,df->...f", x, w_up.astype(x.dtype), preferred_element_type=jnp.float32)
    if b_up is not None:
        h = h + b_up.astype(jnp.float32)
    h = relu2(h).astype(x.dtype)
    y = jnp.einsum("...f,fd->...d", h, w_down.astype(x.dtype), preferred_element_type=jnp.float32)
    if b_down is not None:
        y = y + b_down.astype(jnp.float32)
    return y.astype(x.dtype)
