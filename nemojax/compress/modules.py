"""Building modules from existing weights: an unmaterialised shell filled with computed arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def host(variable) -> np.ndarray:
    """A parameter's value as a NumPy array: selecting rows or columns on the host compiles nothing,
    where a jnp gather compiles a program for every new shape (most of a library's build time)."""
    return np.asarray(variable[...])


def shell(make):
    """The module `make()` builds, its parameters shapes only: `copy_into` fills every one (no random
    initialisation to compute, which costs more than the copies on a CPU)."""
    return nnx.eval_shape(make)


def copy_into(module, values: dict) -> None:
    """Sets the named parameters ("up_proj.kernel", "branches.0.norm.weight") of a `shell` module; every
    parameter must then hold an array."""
    for name, value in values.items():
        target = module
        *path, leaf = name.split(".")
        for p in path:
            target = target[int(p)] if p.isdigit() else getattr(target, p)
        var = getattr(target, leaf)
        want = var.get_value()
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(f"{name}: expected shape {want.shape}; got {value.shape}")
        var.set_value(jnp.asarray(value, want.dtype))
    missing = [jax.tree_util.keystr(path) for path, v in jax.tree_util.tree_leaves_with_path(nnx.state(module))
               if isinstance(v, jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"parameters left unset: {missing}")
