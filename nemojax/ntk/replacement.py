"""Predicted effect of replacing one residual block (remove / linearise / fuse with the next)
on the residual MLP's NTK: the relative kernel change and the per-frequency eigenvalue change on
the sphere, ready to rank candidate replacements (smaller = predicted safer)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from nemojax.ntk.resnet import resnet_ntk
from nemojax.ntk.spectra import zonal_spectrum


def resnet_ntk_dot(t, *, depth: int, alpha, replace=None):
    """The residual NTK on the unit sphere as a function of u = <x, z> (it is zonal there)."""
    t = jnp.clip(jnp.asarray(t), -1.0, 1.0)
    x = jnp.array([[1.0, 0.0]], dtype=t.dtype)
    z = jnp.stack([t.ravel(), jnp.sqrt(1 - t.ravel() ** 2)], axis=1)
    return resnet_ntk(x, z, depth=depth, alpha=alpha, replace=replace)[0].reshape(t.shape)


def candidate_replacements(depth: int):
    """(block, op, replace-dict) for every block and operation; 'fuse' joins a block with the next."""
    out = []
    for i in range(depth):
        out += [(i, "remove", {i: "remove"}), (i, "linear", {i: "linear"})]
        if i + 1 < depth:
            out.append((i, "fuse", {i: ("fuse", i + 1)}))
    return out


def kernel_change(*, depth: int, alpha, replace, n_grid: int = 401) -> float:
    """sup_u |K'(u) - K(u)| / K(1) over n_grid cosines u in [-1, 1], K the residual NTK on the unit sphere
    and K' the NTK after `replace`: how far the replacement moves the kernel."""
    u = jnp.linspace(-1, 1, n_grid)
    base = resnet_ntk_dot(u, depth=depth, alpha=alpha)
    new = resnet_ntk_dot(u, depth=depth, alpha=alpha, replace=replace)
    return float(jnp.max(jnp.abs(new - base)) / base[-1])


def replacement_effects(*, depth: int, alpha, d: int, kmax: int = 20, n_quad: int = 4000):
    """For each candidate: `kernel_change` = sup_u |K'(u) - K(u)| / K(1) on S^{d-1}, and
    `spectrum_change` = mu'_k / mu_k - 1 for k = 0..kmax (Funk-Hecke eigenvalues)."""
    def kappa(replace):
        return lambda t: np.asarray(resnet_ntk_dot(jnp.asarray(t), depth=depth, alpha=alpha, replace=replace))

    base_mu = zonal_spectrum(kappa(None), d, kmax, n_quad)
    rows = []
    for block, op, replace in candidate_replacements(depth):
        mu = zonal_spectrum(kappa(replace), d, kmax, n_quad)
        rows.append({"block": block, "op": op,
                     "kernel_change": kernel_change(depth=depth, alpha=alpha, replace=replace),
                     "spectrum_change": mu / base_mu - 1})
    return rows
