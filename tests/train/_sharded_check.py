"""Multi-device checks on 8 virtual CPU devices, run by test_sharding.py in a subprocess (the device
count must be fixed before jax starts, and the pytest process has already started it with one).

    python _sharded_check.py RUNS_DIR TRAIN_CONFIG_JSON

Prints one JSON line: {check name: {measured numbers}}; test_sharding.py asserts on them. The training
runs (`trainer_runs`) are left in RUNS_DIR for test_sharding.py to compare with its own runs.
"""

from __future__ import annotations

import os

# Cheap LLVM codegen: these checks compile a dozen small programs and run each once.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import nemojax as nj  # noqa: E402
import nemojax.nn.ffn as ffn_module  # noqa: E402
from nemojax.ops.moe import moe_ffn  # noqa: E402
from nemojax.ops.moe.expert_parallel import moe_ffn_expert_parallel  # noqa: E402
from nemojax.train import sharding as sh  # noqa: E402


def rel_err(a_tree, b_tree) -> float:
    """max over leaves of max|a - b| / max|b|."""
    errs = [float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
            for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True)]
    return max(errs)


def shardings_match(arrays, shardings) -> bool:
    return all(a.sharding.is_equivalent_to(s, a.ndim)
               for a, s in zip(jax.tree.leaves(arrays), jax.tree.leaves(shardings), strict=True))


# ------------------------------------------------------------------------------- model steps
def masked_ce(graphdef, params, rest, batch):
    logits = nnx.merge(graphdef, params, rest)(batch["inputs"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["mask"]) / jnp.sum(batch["mask"])


def make_problem(preset: str):
    model = nj.HybridLM(nj.presets.get(preset), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Non-zero correction biases, so that a mis-sharded `rest` would change the routing.
    rest = jax.tree.map(lambda b: b + 0.05 * jax.random.normal(jax.random.key(3), b.shape, b.dtype), rest)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 256)
    mask = (jax.random.uniform(jax.random.key(2), (8, 16)) > 0.25).astype(jnp.float32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
    vg = jax.value_and_grad(partial(masked_ce, graphdef))
    loss, grads = jax.jit(vg)(params, rest, batch)  # the single-device oracle
    return graphdef, params, rest, batch, vg, loss, grads


def step_check(problem, mesh_shape) -> dict:
    graphdef, params, rest, batch, vg, loss_ref, grads_ref = problem
    mesh = sh.make_mesh(*mesh_shape)
    p_shard = sh.param_shardings(params, mesh)
    params_s, rest_s = sh.shard_state(params, mesh), sh.shard_state(rest, mesh)
    batch_s = jax.device_put(batch, sh.batch_sharding(mesh))
    placed = shardings_match(params_s, p_shard) and shardings_match(rest_s, sh.param_shardings(rest, mesh))
    # The gradients are pinned to the parameters' layout (reduce-scatter under FSDP); left to itself
    # the partitioner may return them replicated.
    step = jax.jit(vg, out_shardings=(NamedSharding(mesh, P()), p_shard))
    loss, grads = step(params_s, rest_s, batch_s)

    tx = optax.adamw(1e-3, weight_decay=0.1)
    opt_state = tx.init(params_s)
    opt_shard = sh.to_shardings(sh.opt_state_specs(tx, opt_state, sh.param_specs(params, mesh)), mesh)
    opt_state = jax.device_put(opt_state, opt_shard)

    @jax.jit
    def update(p, o, g):
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    new_params, new_opt = update(params_s, opt_state, grads)
    return {"loss_err": abs(float(loss) - float(loss_ref)) / abs(float(loss_ref)),
            "grad_err": rel_err(grads, grads_ref),
            "placed": placed,
            "grads_sharded_like_params": shardings_match(grads, p_shard),
            "update_keeps_shardings": shardings_match((new_params, new_opt), (p_shard, opt_shard)),
            "sharded_leaves": sum(any(a is not None for a in s.spec) for s in jax.tree.leaves(p_shard))}


@contextlib.contextmanager
def counting_ep_calls():
    """Yields a list that gets one entry per trace reaching nn.ffn's moe_ffn_expert_parallel."""
    calls, original = [], ffn_module.moe_ffn_expert_parallel

    def counted(*args, **kw):
        calls.append(kw["mesh"].shape["expert"])
        return original(*args, **kw)

    ffn_module.moe_ffn_expert_parallel = counted
    try:
        yield calls
    finally:
        ffn_module.moe_ffn_expert_parallel = original


def ep_in_model_check(problem, mesh_shape) -> dict:
    """The whole tiny-moe step with the model's MoE layers set to expert parallelism by
    `configure_moe(expert_mesh=...)`; counts the calls that reach moe_ffn_expert_parallel."""
    graphdef, params, rest, batch, _, loss_ref, grads_ref = problem
    mesh = sh.make_mesh(*mesh_shape)
    model = nnx.merge(graphdef, params, rest)
    ffn_module.configure_moe(model, expert_mesh=mesh)
    ep_graphdef = nnx.split(model, nnx.Param, ...)[0]
    with counting_ep_calls() as calls:
        loss, grads = jax.jit(jax.value_and_grad(partial(masked_ce, ep_graphdef)))(
            sh.shard_state(params, mesh), sh.shard_state(rest, mesh), jax.device_put(batch, sh.batch_sharding(mesh)))
    return {"ep_calls": len(calls), "loss_err": abs(float(loss) - float(loss_ref)) / abs(float(loss_ref)),
            "grad_err": rel_err(grads, grads_ref)}


EP_MESH = "data=2,fsdp=2,expert=2"


def trainer_runs(runs_dir: str, settings: dict) -> dict:
    """`nemojax.train` runs of `settings` (tiny-moe, a few steps, checkpoints every 2): "data8" on --mesh
    data=8 (data parallel only), "ep" on --mesh data=2,fsdp=2,expert=2 (expert parallel MoE, FSDP), and
    "data8_to_ep": the data8 run resumed from its step-2 checkpoint on the ep mesh. Returns how many
    traces went through the expert-parallel dispatch."""
    from nemojax.train import TrainConfig, train

    with counting_ep_calls() as calls:
        for name, mesh in (("data8", "data=8"), ("ep", EP_MESH)):
            train(TrainConfig(**settings, mesh=mesh, out_dir=f"{runs_dir}/{name}"), quiet=True)
        shutil.copytree(f"{runs_dir}/data8", f"{runs_dir}/data8_to_ep")
        train(TrainConfig(**settings, mesh=EP_MESH, resume_step=2, out_dir=f"{runs_dir}/data8_to_ep"), quiet=True)
    return {"ep_traces": len(calls)}


# ---------------------------------------------------------------------------- expert parallel
def moe_inputs(t=64, d=16, f=8, e=8, k=2):
    ks = jax.random.split(jax.random.key(7), 5)
    x = jax.random.normal(ks[0], (t, d))
    weights = jax.random.uniform(ks[1], (t, k), minval=0.1)
    # Distinct experts per token, all in [0, e - 1): expert e - 1 receives no token.
    first = jax.random.randint(ks[2], (t,), 0, e - 1)
    second = (first + 1 + jax.random.randint(ks[2], (t,), 0, e - 2)) % (e - 1)
    indices = jnp.stack([first, second], 1)[:, :k].astype(jnp.int32)
    w_up = jax.random.normal(ks[3], (e, d, f)) / math.sqrt(d)
    w_down = jax.random.normal(ks[4], (e, f, d)) / math.sqrt(f)
    return x, weights, indices, w_up, w_down


def ep_check(mesh_shape) -> dict:
    mesh = sh.make_mesh(*mesh_shape)
    x, weights, indices, w_up, w_down = moe_inputs()
    probe = jax.random.normal(jax.random.key(9), x.shape)

    def loss(fn, x, weights, w_up, w_down):
        return jnp.sum(probe * fn(x, weights, indices, w_up, w_down))

    ep = partial(moe_ffn_expert_parallel, mesh=mesh)
    y = jax.jit(ep)(x, weights, indices, w_up, w_down)
    grads = jax.jit(jax.grad(partial(loss, ep), argnums=(0, 1, 2, 3)))(x, weights, w_up, w_down)
    grads_ref = jax.jit(jax.grad(partial(loss, moe_ffn), argnums=(0, 1, 2, 3)))(x, weights, w_up, w_down)
    out = {"forward_err": rel_err(y, moe_ffn(x, weights, indices, w_up, w_down)),
           "unused_expert_grad": float(jnp.max(jnp.abs(grads[2][-1])) + jnp.max(jnp.abs(grads[3][-1])))}
    out.update({f"grad_err_{n}": rel_err(g, r) for n, g, r in zip(("x", "weights", "w_up", "w_down"), grads,
                                                                     grads_ref)})
    return out


def np_capacity_oracle(x, weights, indices, w_up, w_down, n_blocks, n_expert, capacity):
    """Token loop with the documented drop rule: per token block (one device), per destination device,
    assignments beyond the first `capacity` in (token, k) order are dropped."""
    x, weights, w_up, w_down = (np.asarray(a, np.float64) for a in (x, weights, w_up, w_down))
    indices = np.asarray(indices)
    t, k = indices.shape
    per_block, e_local = t // n_blocks, w_up.shape[0] // n_expert
    y = np.zeros_like(x)
    dropped = 0
    for b in range(n_blocks):
        sent = [0] * n_expert
        for tok in range(b * per_block, (b + 1) * per_block):
            for j in range(k):
                e = int(indices[tok, j])
                dest = e // e_local
                if sent[dest] < capacity:
                    y[tok] += weights[tok, j] * (np.maximum(x[tok] @ w_up[e], 0) ** 2) @ w_down[e]
                else:
                    dropped += 1
                sent[dest] += 1
    return y, dropped / indices.size


def ep_capacity_check(mesh_shape, capacity_factor) -> dict:
    mesh = sh.make_mesh(*mesh_shape)
    x, weights, indices, w_up, w_down = moe_inputs()
    y, dropped = jax.jit(partial(moe_ffn_expert_parallel, mesh=mesh, capacity_factor=capacity_factor,
                                 return_dropped=True))(x, weights, indices, w_up, w_down)
    n_blocks, n_expert = mesh.size, mesh.shape["expert"]
    capacity = math.ceil(capacity_factor * (x.shape[0] // n_blocks) * indices.shape[1] / n_expert)
    y_ref, dropped_ref = np_capacity_oracle(x, weights, indices, w_up, w_down, n_blocks, n_expert, capacity)
    return {"forward_err": float(np.max(np.abs(np.asarray(y) - y_ref)) / np.max(np.abs(y_ref))),
            "dropped": float(dropped), "dropped_ref": dropped_ref}


def mesh_name(shape) -> str:
    return "x".join(map(str, shape))


# Every axis and layer kind once: routed experts over expert x fsdp, pure data parallelism, and
# LatentMoE + MTP with fsdp = 4.
STEP_RUNS = [("tiny-moe", (2, 2, 2)), ("tiny-hybrid", (8, 1, 1)), ("tiny-latent-mtp", (1, 4, 2))]
EP_MESHES = [(1, 1, 8), (2, 1, 4)]


def main(runs_dir: str, settings: dict) -> dict:
    results = {"devices": jax.device_count(), "mesh_minus_one": dict(sh.make_mesh(data=-1, expert=2).shape)}
    for mesh_shape in EP_MESHES:
        results[f"ep_{mesh_name(mesh_shape)}"] = ep_check(mesh_shape)
    results["ep_capacity_2x1x4"] = ep_capacity_check((2, 1, 4), 1.0)
    problems = {}
    for preset, mesh_shape in STEP_RUNS:
        if preset not in problems:
            problems[preset] = make_problem(preset)
        results[f"step_{preset}_{mesh_name(mesh_shape)}"] = step_check(problems[preset], mesh_shape)
    results["ep_in_model_tiny-moe_2x2x2"] = ep_in_model_check(problems["tiny-moe"], (2, 2, 2))
    results["trainer_runs"] = trainer_runs(runs_dir, settings)
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
