"""Routed experts the obvious way: every expert on every token, weighted by the router's gate.

E/K times the FLOPs of a dispatch that runs each expert only on its own tokens, so it is the
oracle of the dispatches (dispatch.py), and the fastest choice only for a handful of experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.ops.ffn import relu2


def dense_moe(x, weights, indices, w_up, w_down, *, kept=None, cap=None):
    """sum_k kept_tk weights_tk relu2(x_t @ w_up[e_tk]) @ w_down[e_tk] in fp32 [T, D]; the
    arguments as the dispatches take them (dispatch.py), `cap` unused: nothing is buffered."""
    del cap
    e = w_up.shape[0]
    if kept is not None:
        weights = jnp.where(kept, weights, 0.0)
    gate = jnp.sum(jax.nn.one_hot(indices, e, dtype=jnp.float32) * weights[..., None], axis=1)  # [T, E]
    h = relu2(jnp.einsum("td,edf->tef", x, w_up, preferred_element_type=jnp.float32))
    # gating before the down projection contracts (e, f) at once: no [T, E, D] intermediate
    return jnp.einsum("tef,efd->td", (h * gate[..., None]).astype(x.dtype), w_down,
                      preferred_element_type=jnp.float32)
