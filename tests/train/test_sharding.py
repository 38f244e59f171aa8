"""Partition rules, mesh construction and expert parallelism.

The multi-device checks run in a subprocess with 8 virtual CPU devices (`_sharded_check.py`): the
oracle there is the same computation on one device (sharded training step) and `moe_ffn` / a token
loop (expert parallelism). The rule checks here need only an AbstractMesh.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

import nemojax as nj
from nemojax.ops.moe import capacity, moe_ffn_expert_parallel
from nemojax.train import sharding as sh

TINY = ["tiny-hybrid", "tiny-moe", "tiny-latent-mtp"]
CHECK = Path(__file__).with_name("_sharded_check.py")


def abstract_mesh(data, fsdp, expert):
    return AbstractMesh((data, fsdp, expert), sh.MESH_AXES)


def split(preset):
    model = nnx.eval_shape(lambda: nj.HybridLM(nj.presets.get(preset), rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param, ...)


def flat(state):
    return {"/".join(map(str, path)): var.get_value().shape for path, var in nnx.to_flat_state(state)}


def flat_specs(specs):
    return {"/".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(specs)}


def expected_spec(path, shape, fsdp):
    """The rules restated by leaf name and shape alone (tiny presets: every dim is even)."""
    leaf = path.split("/")[-1]
    if len(shape) == 1 or leaf == "conv_weight":
        return P()
    if len(shape) == 3:  # routed experts [E, a, b]: E over expert, the larger of a, b over fsdp
        return P("expert", "fsdp", None) if shape[1] >= shape[2] else P("expert", None, "fsdp")
    assert leaf in ("kernel", "embeddings", "lm_head", "gate_weight"), path
    return P("fsdp", None) if shape[0] >= shape[1] else P(None, "fsdp")


# ------------------------------------------------------------------------------------ rules
@pytest.mark.parametrize("preset", TINY)
def test_every_parameter_gets_the_rule_spec(preset):
    _, params, rest = split(preset)
    assert flat(params)
    mesh = abstract_mesh(2, 2, 2)
    for state in (params, rest):
        specs = sh.param_specs(state, mesh)
        assert jax.tree.structure(specs) == jax.tree.structure(state)
        got, shapes = flat_specs(specs), flat(state)
        assert got.keys() == shapes.keys()
        for path, shape in shapes.items():
            assert got[path] == expected_spec(path, shape, 2), (path, shape, got[path])
            for dim, axis in zip(shape, got[path]):
                assert axis is None or dim % mesh.shape[axis] == 0


def test_full_size_presets_replicate_almost_nothing():
    _, params, _ = split("nemotron-3-nano-30b-a3b")
    plan = sh.sharding_plan(params, abstract_mesh(1, 8, 8))
    shapes = flat(params)
    assert plan.keys() == shapes.keys()
    replicated = sum(math.prod(shapes[p]) for p, (spec, _) in plan.items() if all(a is None for a in spec))
    assert replicated / sum(math.prod(s) for s in shapes.values()) < 1e-4
    experts = [p for p in plan if p.endswith(("mixer/up_proj", "mixer/down_proj"))]
    assert experts and all(plan[p][0][0] == "expert" and "fsdp" in plan[p][0] for p in experts)


def test_fsdp_replicates_indivisible_matrices_and_says_so():
    _, params, _ = split("tiny-hybrid")  # dims 64, 128, 196, 256: none divisible by 3
    plan = sh.sharding_plan(params, abstract_mesh(1, 3, 1))
    matrices = [p for p, s in flat(params).items() if len(s) == 2 and not p.endswith("conv_weight")]
    assert matrices
    for p in matrices:
        spec, why = plan[p]
        assert all(a is None for a in spec) and "replicated over fsdp" in why, (p, spec, why)


def test_indivisible_expert_count_raises():
    _, params, _ = split("tiny-moe")  # 8 experts
    with pytest.raises(ValueError, match="num_experts=8.*expert=3"):
        sh.param_specs(params, abstract_mesh(1, 1, 3))


def test_unmatched_parameter_raises_and_intermediates_are_replicated():
    model = nnx.eval_shape(lambda: nj.HybridLM(nj.presets.get("tiny-moe"), rngs=nnx.Rngs(0)))
    model.layers[1].mixer.load = nnx.Intermediate(jnp.zeros((8,)))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    assert flat_specs(sh.param_specs(rest, abstract_mesh(2, 2, 2)))["layers/1/mixer/load"] == P()
    model.layers[0].mixer.mystery = nnx.Param(jnp.zeros((64, 64)))
    with pytest.raises(ValueError, match="no parameter rule for 'layers/0/mixer/mystery'"):
        sh.param_specs(nnx.split(model, nnx.Param, ...)[1], abstract_mesh(2, 2, 2))


# ------------------------------------------------------------------------------- mesh shapes
@pytest.mark.parametrize("kwargs,match", [
    (dict(fsdp=3), "fsdp=3 \\* expert=1 = 3 does not divide the 8 devices, so data=-1 has no size"),
    (dict(data=2, fsdp=2, expert=3), "data=2 \\* fsdp=2 \\* expert=3 = 12 must equal the number of devices \\(8\\)"),
    (dict(data=-1, expert=-1), "only one axis may be -1; got -1 for data, expert"),
    (dict(expert=0), "expert must be a positive int or -1"),
    (dict(fsdp=2.0), "fsdp must be a positive int or -1"),
])
def test_bad_mesh_shapes_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sh.make_mesh(devices=[object()] * 8, **kwargs)  # the shape is checked before any device is used


def test_single_device_mesh():
    mesh = sh.make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "expert": 1}


# -------------------------------------------------------------------------- expert parallel
def test_capacity_formula():
    # a device's send buffer: its 32 assignments over 4 destination devices, at most all 32 to one
    assert capacity(32, 4, None, limit=32) == 32
    assert capacity(32, 4, 1.0, limit=32) == 8
    assert capacity(32, 4, 1.3, limit=32) == 11  # ceil(10.4)
    assert capacity(32, 4, 100.0, limit=32) == 32
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity(32, 4, 0.0, limit=32)


def test_expert_parallel_argument_errors():
    x, w, i = jnp.ones((16, 4)), jnp.ones((16, 2)), jnp.zeros((16, 2), jnp.int32)
    up, down = jnp.ones((6, 4, 3)), jnp.ones((6, 3, 4))
    with pytest.raises(ValueError, match="num_experts=6 must be divisible by the mesh's expert=4"):
        moe_ffn_expert_parallel(x, w, i, up, down, mesh=abstract_mesh(2, 1, 4))
    with pytest.raises(ValueError, match="token_axes=\\('data',\\) must be mesh axes"):
        moe_ffn_expert_parallel(x, w, i, up, down, mesh=abstract_mesh(2, 1, 2), token_axes=("data",))
    with pytest.raises(ValueError, match="T=16 tokens must be divisible by the 24 devices"):
        moe_ffn_expert_parallel(x, w, i, up, down, mesh=abstract_mesh(2, 4, 3))


# ------------------------------------------------------------------ 8 devices, in a subprocess
@pytest.fixture(scope="module")
def multi():
    proc = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_step(r):
    assert r["placed"] and r["grads_sharded_like_params"] and r["update_keeps_shardings"], r
    assert r["loss_err"] < 1e-6 and r["grad_err"] < 1e-5, r


def test_subprocess_has_8_devices(multi):
    assert multi["devices"] == 8
    assert multi["mesh_minus_one"] == {"data": 4, "fsdp": 1, "expert": 2}


@pytest.mark.parametrize("name", ["tiny-moe_2x2x2", "tiny-hybrid_8x1x1", "tiny-latent-mtp_1x4x2"])
def test_sharded_step_equals_single_device_step(multi, name):
    assert_step(multi[f"step_{name}"])


def test_fsdp_and_expert_axes_shard_something(multi):
    assert multi["step_tiny-moe_2x2x2"]["sharded_leaves"] > 0
    assert multi["step_tiny-latent-mtp_1x4x2"]["sharded_leaves"] > 0
    assert multi["step_tiny-hybrid_8x1x1"]["sharded_leaves"] == 0  # pure data parallelism


@pytest.mark.parametrize("mesh", ["1x1x8", "2x1x4"])
def test_expert_parallel_equals_moe_ffn(multi, mesh):
    r = multi[f"ep_{mesh}"]
    for key in ("forward_err", "grad_err_x", "grad_err_weights", "grad_err_w_up", "grad_err_w_down"):
        assert r[key] < 1e-5, (key, r)
    assert r["unused_expert_grad"] == 0.0  # the expert that receives no token


def test_expert_parallel_drop_rule_matches_token_loop(multi):
    r = multi["ep_capacity_2x1x4"]
    assert r["forward_err"] < 1e-5
    assert 0 < r["dropped"] == r["dropped_ref"]


def test_expert_parallel_inside_the_model(multi):
    r = multi["ep_in_model_tiny-moe_2x2x2"]
    assert r["ep_calls"] == 2  # configure_moe(expert_mesh=) sent both MoE layers through the all-to-all path
    assert r["loss_err"] < 1e-6 and r["grad_err"] < 1e-5


def test_trainer_expert_parallel_mesh_matches_data_parallel(multi):
    r = multi["trainer_tiny-moe_ep"]
    assert r["steps"] == 4 and r["load_keys"] > 0 and r["ep_traces"] > 0  # the EP run did go through it
    assert r["loss_err"] < 1e-5 and r["load_err"] < 1e-6, r

