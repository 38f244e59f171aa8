"""Training-free predictions of the damage that replacing blocks does to a trained residual network,
from the residual NTK theory (`nemojax.ntk.resnet`) with each block's scale measured on the network,
alpha_j = |h_j| / |x| (its residual contribution relative to the stream it reads; for a nemojax model
`fusion.residual_stats(model, batches)["rel_norm"]`), and from the network's own empirical NTK.

Replacements use the format of `resnet_ntk`: {block: "remove" | "linear" | ("fuse", last_block)}.

- `alpha_law`: the leading order in alpha of the output change a replacement causes, relative to the
  variance of the stream the replaced blocks read (infinite width, weights shared before and after):
      remove j        alpha_j^2
      linear j        (1/2 - 1/pi) alpha_j^2     (the part of relu that its best L2 affine stand-in misses)
      fuse i..j       sum_{i <= k < l <= j} alpha_k^2 alpha_l^2
  Block l of a fused run reads x_{i-1} instead of x_{l-1}, an input off by sum_{k<l} h_k, and changes
  its output by its Jacobian times that; the blocks' output weights are independent, so the changes
  add in variance. Removal and linearisation are O(alpha^2), fusion O(alpha^4).
- `surgery_change`: the same quantity to every order and for the whole network,
  Var(f_B(x) - f_A(x)) / Var f_A(x) with B = A after the replacement (`resnet_cross_kernels` at x = z).
- `kernel_change` (in `replacement`): how far the replacement moves the NTK, sup_u |K_B - K_A| / K_A(1).
- `lm_empirical_ntk`: the empirical NTK of a language model's scalar outputs, to compare a trained
  model's kernel with its kernel after surgery.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.ntk.resnet import block_ops, resnet_cross_kernels

# 2 E[(relu(z) - psi(z))^2] / Var z, psi(z) = z/2 + sd(z)/sqrt(2 pi) the Hermite projection of relu:
# E relu^2 = 1/2, E psi^2 = 1/4 + 1/(2 pi), and E[relu psi] = E psi^2 (psi is a projection).
LINEAR_GAIN = 0.5 - 1 / np.pi


def _alphas(alpha) -> np.ndarray:
    a = np.asarray(alpha, np.float64)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"alpha must be a 1-D array of finite values >= 0, one per block; got {alpha!r}")
    return a


def alpha_law(alpha, replace: Mapping) -> float:
    """The leading-order relative output change of `replace` (see the module docstring); `alpha` gives
    every block's scale (its length is the depth)."""
    a2 = _alphas(alpha) ** 2
    if not replace:
        raise ValueError("replace must name at least one block to replace; got an empty mapping")
    ops = block_ops(len(a2), replace)
    total, l = 0.0, 0
    while l < len(ops):
        op, start = ops[l]
        if op == "remove":
            total += a2[l]
        elif op == "linear":
            total += LINEAR_GAIN * a2[l]
        elif start < l:  # a later block of a fused run: its input lacks the run's earlier contributions
            total += a2[l] * a2[start:l].sum()
        l += 1
    return float(total)


def surgery_change(alpha, replace: Mapping) -> float:
    """Var(f_B(x) - f_A(x)) / Var f_A(x) at infinite width for the residual ReLU MLP with block scales
    `alpha` (A) and the same weights after `replace` (B): the output change surgery makes, relative to
    the output, from the cross-kernels. On the sphere it does not depend on x. Computed in the dtype of
    jnp.asarray(alpha) (float64 under `jax.enable_x64()`)."""
    a = jnp.asarray(_alphas(alpha))
    depth = int(a.shape[0])
    block_ops(depth, replace)  # the replacement's errors, named, before any kernel is computed
    x = jnp.ones((1, 1), a.dtype)
    same = resnet_cross_kernels(x, depth=depth, alpha=a)[0]
    cross = resnet_cross_kernels(x, depth=depth, alpha=a, replace_z=replace)[0]
    modified = resnet_cross_kernels(x, depth=depth, alpha=a, replace_x=replace, replace_z=replace)[0]
    return float(((same + modified - 2 * cross) / same)[0, 0])


def lm_empirical_ntk(model: nnx.Module, tokens, projection) -> np.ndarray:
    """Empirical NTK Gram [n, n] (float64) of a language model's scalar outputs
    f_i = <projection, logits of window i at its last position>, with respect to every nnx.Param leaf:
    Theta_ij = <df_i/dtheta, df_j/dtheta>.

    tokens: int [n, T], one window per output (each run on its own, so T is the context each output
    sees). projection: [vocab]; one orthogonal to the all-ones vector makes f a function of the
    next-token distribution (logits are defined up to a shift). `model(tokens [B, T])` must give logits
    [B, T, vocab]. Cost: one forward and backward per window, and memory for the n x #params Jacobian."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.size == 0:
        raise ValueError(f"tokens must be a non-empty int array [n, T] of windows; got {tokens.dtype} {tokens.shape}")
    projection = jnp.asarray(projection, jnp.float32)
    if projection.ndim != 1:
        raise ValueError(f"projection must be a vector over the vocabulary; got shape {projection.shape}")
    return np.asarray(_lm_gram(model, tokens, projection), np.float64)


@nnx.jit
def _lm_gram(model, tokens, projection):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def output(p, window):
        logits = nnx.merge(graphdef, p, rest)(window[None])[0, -1]
        if logits.shape != projection.shape:
            raise ValueError(f"projection has {projection.shape[0]} entries; the model's logits have "
                             f"{logits.shape[0]}")
        return logits.astype(jnp.float32) @ projection

    grads = jax.vmap(jax.grad(output), in_axes=(None, 0))(params, tokens)
    gram = 0.0
    for g in jax.tree.leaves(grads):  # sum over leaves of J_leaf J_leaf^T, accumulated in fp32
        g = g.reshape(tokens.shape[0], -1).astype(jnp.float32)
        gram = gram + jnp.matmul(g, g.T, precision=jax.lax.Precision.HIGHEST)
    return gram
