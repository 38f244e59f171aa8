"""Device mesh and partition rules for HybridLM training (MaxText / levanter conventions).

Mesh axes: "data" (pure data parallelism), "fsdp" (data parallelism whose members also split the
weights, ZeRO-3 style: the compiler all-gathers a weight before use and reduce-scatters its
gradient) and "expert" (expert parallelism: routed experts are split over it; outside the MoE
layers it is one more data axis, so the batch is split over all three).

Partition rules, per parameter: each layer kind declares its parameters' `ParamRule`s in
`nemojax.nn.registry` (`param_rule(path)`), whose `shard` is one of

- "expert": routed experts `mixer/up_proj` [E, Din, F], `mixer/down_proj` [E, F, Din]: E over
  "expert" (num_experts must divide), the larger of the two other dims that "fsdp" divides over "fsdp";
- "fsdp": matrices (`embeddings`, `lm_head`, every `Linear` kernel, the router `gate_weight`): the
  largest dim that "fsdp" divides over "fsdp"; replicated when "fsdp" divides none
  (`fsdp_replicated` lists those);
- "replicated": vectors (norms, Mamba A_log / D / dt_bias / norm_weight, biases, the router's
  correction bias) and the depthwise conv filter [K, C] (K = 4 taps: as small as a bias). Every
  device reads them whole at every step; splitting would only add collectives.

A parameter that no layer kind declares raises, so a new parameter cannot be replicated silently.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nemojax.nn.registry import param_rule

if TYPE_CHECKING:
    from nemojax.train.config import TrainConfig

MESH_AXES = ("data", "fsdp", "expert")
# The batch is split over every axis: outside the MoE layers the expert axis is data parallel too.
BATCH_AXES = ("data", "fsdp", "expert")

_NDIM = {"expert": 3, "fsdp": 2}


def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp", "expert") mesh over `devices` (default: all, of every process). One size may be
    -1: the rest. Devices fill the mesh in `jax.devices()` order, which lists one process's devices after
    another's, so on several processes "data" (the outer axis) spans them and "expert" stays within one
    where it fits: its all-to-all then never crosses hosts."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert}
    for name, n in sizes.items():
        if not isinstance(n, int) or (n < 1 and n != -1):
            raise ValueError(f"make_mesh: {name} must be a positive int or -1 (the remaining devices); got {n!r}")
    free = [name for name, n in sizes.items() if n == -1]
    if len(free) > 1:
        raise ValueError(f"make_mesh: only one axis may be -1; got -1 for {', '.join(free)}")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    desc = " * ".join(f"{k}={v}" for k, v in sizes.items() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"make_mesh: {desc} = {fixed} does not divide the {len(devices)} devices, so "
                             f"{free[0]}=-1 has no size")
        sizes[free[0]] = len(devices) // fixed
    elif fixed != len(devices):
        raise ValueError(f"make_mesh: {desc} = {fixed} must equal the number of devices ({len(devices)})")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over the mesh's `BATCH_AXES`, the rest replicated; fits arrays of any rank
    and serves as a tree prefix for a whole batch dict."""
    return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def process_rows(sharding: NamedSharding, batch_size: int) -> np.ndarray:
    """The rows of a global batch [batch_size, ...] placed by `sharding` that this process's devices hold,
    sorted (every row in a single process)."""
    held = sharding.addressable_devices_indices_map((batch_size,)).values()
    return np.unique(np.concatenate([np.arange(batch_size)[index[0]] for index in held]))


def load_batch(ds, step: int, mesh: Mesh | None) -> dict:
    """Batch `step` of the dataset `ds` as global arrays split over `mesh`'s batch axes (`batch_sharding`),
    this process reading only the rows that its own devices hold (`ds.batch(step, rows)`); with no mesh,
    the whole batch on the default device."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, ds.batch(step))
    sharding = batch_sharding(mesh)
    rows = process_rows(sharding, ds.batch_size)

    def place(x):
        return jax.make_array_from_callback(
            (ds.batch_size, *x.shape[1:]), sharding,
            lambda index: x[np.searchsorted(rows, np.arange(ds.batch_size)[index[0]])])
    return jax.tree.map(place, ds.batch(step, rows))


# ------------------------------------------------------------------------------------------ rules
def _path_str(path) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _fsdp_dim(shape, dims, n: int):
    """The largest of `dims` that n divides (lowest index on ties), or None."""
    fits = [d for d in dims if shape[d] % n == 0]
    return max(fits, key=lambda d: (shape[d], -d)) if fits else None


def _plan_one(path: str, shape, kind: str, mesh_shape) -> tuple[P, str]:
    if kind == "replicated":
        return P(), "replicated: vector, conv filter or step statistic"
    if len(shape) != _NDIM[kind]:
        raise ValueError(f"partition rules: {path} has shape {shape}; rule kind {kind!r} expects "
                         f"{_NDIM[kind]} dims")
    spec, reason = [None] * len(shape), kind
    n_exp = mesh_shape.get("expert", 1)
    if kind == "expert" and n_exp > 1:
        if shape[0] % n_exp:
            raise ValueError(f"partition rules: {path} has num_experts={shape[0]}, not divisible by the mesh's "
                             f"expert={n_exp}")
        spec[0] = "expert"
    n_fsdp = mesh_shape.get("fsdp", 1)
    if n_fsdp > 1:
        d = _fsdp_dim(shape, range(1 if kind == "expert" else 0, len(shape)), n_fsdp)
        if d is None:
            reason = f"{kind}: replicated over fsdp ({shape} has no dim divisible by fsdp={n_fsdp})"
        else:
            spec[d] = "fsdp"
    return P(*spec), reason


def _rule_kind(path: str, var) -> str:
    if isinstance(var, nnx.Intermediate):  # sown step statistics (router loads, aux losses): small
        return "replicated"
    return param_rule(path.split("/")).shard


def _plan_var(path: str, var, mesh) -> tuple[P, str]:
    return _plan_one(path, np.shape(var.get_value()), _rule_kind(path, var), dict(mesh.shape))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def sharding_plan(state, mesh) -> dict[str, tuple[P, str]]:
    """"/"-joined path -> (PartitionSpec, why) for every Variable of an nnx.State (params or the rest)."""
    return {"/".join(map(str, path)): _plan_var("/".join(map(str, path)), var, mesh)
            for path, var in nnx.to_flat_state(state)}


def fsdp_replicated(state, mesh) -> list[str]:
    """"path shape" of each matrix of an nnx.State that the rules would split over "fsdp" but whose
    dims "fsdp" divides none of, so every device keeps it whole (empty without an fsdp axis > 1)."""
    if dict(mesh.shape).get("fsdp", 1) == 1:
        return []
    out = []
    for path, var in nnx.to_flat_state(state):
        name = "/".join(map(str, path))
        spec = _plan_var(name, var, mesh)[0]
        if _rule_kind(name, var) in _NDIM and "fsdp" not in tuple(spec):
            out.append(f"{name} {tuple(np.shape(var.get_value()))}")
    return out


def param_specs(state, mesh):
    """A PartitionSpec for every Variable of an nnx.State, in the state's own tree structure (each
    Variable node kept, the spec as its leaf), so the result serves as jit in/out_shardings, as
    jax.device_put's target, and as the params tree of `opt_state_specs`.

    `mesh` may be a Mesh or an AbstractMesh (only the axis sizes are read).
    """
    def one(path, var):
        if not _is_var(var):
            raise ValueError(f"partition rules: expected an nnx.State of Variables; {_path_str(path)!r} holds "
                             f"a {type(var).__name__}")
        spec = _plan_var(_path_str(path), var, mesh)[0]
        return jax.tree.map(lambda _: spec, var)
    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def to_shardings(specs, mesh: Mesh):
    """PartitionSpec leaves -> NamedSharding leaves."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(state, mesh: Mesh):
    return to_shardings(param_specs(state, mesh), mesh)


def shard_state(tree, mesh: Mesh, specs=None):
    """jax.device_put of `tree` by `specs` (default: `param_specs(tree, mesh)`, for an nnx.State)."""
    return jax.device_put(tree, to_shardings(param_specs(tree, mesh) if specs is None else specs, mesh))


def opt_state_specs(tx, opt_state, specs):
    """Specs for an optax state: each params-shaped part (Adam's mu, nu, ...) gets the params' `specs`,
    everything else (step counts, scalars) is replicated. `tx` is the optax transformation that built
    `opt_state` (optax.tree_map_params needs it to tell params-shaped parts from the rest)."""
    return optax.tree_map_params(tx, lambda _, spec: spec, opt_state, specs,
                                 transform_non_params=lambda _: P(),
                                 is_leaf=lambda x: isinstance(x, P))


# ----------------------------------------------------------------------------------- training runs
def make_train_mesh(tc: TrainConfig):
    """The mesh of `tc.mesh` ("data=2,fsdp=2,expert=2"); all devices on "data" when unset and there are
    several; None on a single device (no sharding at all)."""
    if tc.mesh is None:
        return make_mesh() if jax.device_count() > 1 else None
    sizes = {}
    for item in tc.mesh.split(","):
        axis, _, n = item.partition("=")
        if axis.strip() not in MESH_AXES or not n.strip().lstrip("-").isdigit():
            raise ValueError(f"mesh: expected AXIS=SIZE items with AXIS in {MESH_AXES}; got {item!r}")
        sizes[axis.strip()] = int(n)
    mesh = make_mesh(**sizes)
    split = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if tc.batch_size % split:
        raise ValueError(f"batch_size {tc.batch_size} must be divisible by the {split} data-parallel devices of "
                         f"mesh {dict(mesh.shape)}")
    return mesh


def shard_train_state(state, tx, mesh):
    """Places the train state on `mesh` by the partition rules (optimizer moments follow their params)."""
    p_specs = param_specs(state["params"], mesh)
    specs = {"params": p_specs, "rest": param_specs(state["rest"], mesh),
             "opt_state": opt_state_specs(tx, state["opt_state"], p_specs), "step": P()}
    return jax.device_put(state, to_shardings(specs, mesh))
