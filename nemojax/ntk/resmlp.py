"""The finite-width residual ReLU MLP whose infinite-width kernels `nemojax.ntk.resnet` computes, with
block surgery (remove / linearise / fuse) expressed as arrays, so that one jitted function serves the
original network and every modified one:

    x_0 = A x,   x_l = x_{l-1} + keep_l alpha_l sqrt(2/m) V_l phi_l(W_l u_l / sqrt(m)),   f = v^T x_L / sqrt(m),

u_l = x_{l-1}, or, for a block fused with its predecessor, the predecessor's input; phi_l = relu, or
for a linearised block the affine stand-in phi_l(h) = a_l * h + b_l * |u_l| / sqrt(m) (per unit). The
default stand-in a = 1/2, b = 1/sqrt(2 pi) is relu's Hermite projection under a Gaussian
pre-activation of variance |u|^2 / m, the one the kernel theory assumes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from nemojax.ntk.resnet import block_ops


def resmlp_init(key, d: int, width: int, depth: int, dtype=jnp.float32):
    """Standard-normal weights: A [m, d], W and V [depth, m, m], v [m]."""
    kA, kW, kV, kv = jax.random.split(key, 4)
    return {"A": jax.random.normal(kA, (width, d), dtype), "W": jax.random.normal(kW, (depth, width, width), dtype),
            "V": jax.random.normal(kV, (depth, width, width), dtype), "v": jax.random.normal(kv, (width,), dtype)}


def surgery_spec(depth: int, width: int, replace: Mapping | None = None, lin_a=0.5, lin_b=1 / math.sqrt(2 * math.pi),
                 dtype=jnp.float32):
    """Arrays describing `replace` (the format of `resnet_ntk`): keep [L], starts [L] (True: the block
    reads the current stream), linear [L], lin_a / lin_b [L, m] (the stand-in's per-unit coefficients)."""
    ops = block_ops(depth, replace)
    return {"keep": jnp.array([op != "remove" for op, _ in ops], dtype),
            "starts": jnp.array([start == i for i, (_, start) in enumerate(ops)]),
            "linear": jnp.array([op == "linear" for op, _ in ops]),
            "lin_a": jnp.broadcast_to(jnp.asarray(lin_a, dtype), (depth, width)),
            "lin_b": jnp.broadcast_to(jnp.asarray(lin_b, dtype), (depth, width))}


def resmlp_apply(params, X, *, alpha, spec=None, return_preacts: bool = False):
    """f(X) [n]; with `return_preacts` also, per block, (pre-activations [n, m], |u| / sqrt(m) [n])."""
    depth, m = params["W"].shape[0], params["W"].shape[1]
    spec = surgery_spec(depth, m, dtype=X.dtype) if spec is None else spec
    alphas = jnp.broadcast_to(jnp.asarray(alpha, X.dtype), (depth,))
    h = X @ params["A"].T
    u, preacts = h, []
    for l in range(depth):
        u = jnp.where(spec["starts"][l], h, u)
        z = u @ params["W"][l].T / math.sqrt(m)
        r = jnp.linalg.norm(u, axis=1) / math.sqrt(m)
        act = jnp.where(spec["linear"][l], spec["lin_a"][l] * z + spec["lin_b"][l] * r[:, None], jax.nn.relu(z))
        h = h + spec["keep"][l] * alphas[l] * math.sqrt(2 / m) * act @ params["V"][l].T
        preacts.append((z, r))
    f = h @ params["v"] / math.sqrt(m)
    return (f, preacts) if return_preacts else f
