"""Partition rules, mesh construction, expert parallelism, and training over several devices and processes.

The multi-device checks run in a subprocess with 8 virtual CPU devices (`_sharded_check.py`): the
oracle there is the same computation on one device (sharded training step) and `moe_ffn` / a token
loop (expert parallelism). It also trains tiny-moe on two meshes and resumes one run on the other;
meanwhile two processes of 4 virtual devices each train the same run with `nemojax train
--distributed` (`_distributed_run.py`): one of them is killed mid-run, both are started again, and
one of them is sent SIGTERM; and a copy of their first checkpoint resumes on one device. The
single-process 8-device run is the oracle of the two-process one and of the resumed runs. The rule
checks need only an AbstractMesh.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

import nemojax as nj
from nemojax.cli import main
from nemojax.io.checkpoint import Checkpointer, CheckpointMismatch
from nemojax.ops.moe import capacity, moe_ffn_expert_parallel
from nemojax.train import TrainConfig, distributed, loop, sharding as sh
from nemojax.train.metrics import read_metrics

TINY = ["tiny-hybrid", "tiny-moe", "tiny-latent-mtp"]
CHECK = Path(__file__).with_name("_sharded_check.py")
RUN = Path(__file__).with_name("_distributed_run.py")
# Cheap LLVM codegen (as in _sharded_check.py): each process compiles a few small programs and runs each a few times.
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The run that every multi-device and multi-process training check trains (checkpoints at steps 2 and 4).
SETTINGS = dict(preset="tiny-moe", data="text", seq_len=32, batch_size=8, steps=4, warmup_steps=1, log_every=1,
                eval_every=4, save_every=2, eval_batches=1, sample_tokens=0)
ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]  # the same, as `nemojax train` flags
EP_MESH = "data=2,fsdp=2,expert=2"
HEARTBEAT = 5  # --heartbeat-timeout of the two-process runs, seconds


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


# ---------------------------------------- 8 devices in a subprocess; two processes of 4 devices each
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def two_processes(root: Path, env: dict, started: list, hang_at: int = -1,
                  term_at: int = -1) -> list[subprocess.Popen]:
    """Starts `nemojax train --distributed` as processes 0 and 1 of one run (out_dir root/run), each
    with 4 CPU devices, logging the batches it reads to root/log{i}.jsonl and its output to
    root/{out,err}{i}.txt (appended); adds them to `started`. Process 1 hangs when it reads training
    batch `hang_at`, and sends itself SIGTERM when the loop reads batch `term_at` (`_distributed_run.py`)."""
    port = free_port()
    procs = []
    for i in range(2):
        argv = [sys.executable, str(RUN), str(root / f"log{i}.jsonl"), str(hang_at), str(term_at), "--", "train", *ARGS,
                f"--mesh={EP_MESH}", f"--out-dir={root / 'run'}", "--distributed",
                f"--coordinator-address=localhost:{port}", "--num-processes=2", f"--process-id={i}",
                f"--heartbeat-timeout={HEARTBEAT}"]
        with open(root / f"out{i}.txt", "a") as out, open(root / f"err{i}.txt", "a") as err:
            procs.append(subprocess.Popen(argv, stdout=out, stderr=err, env=env))
            started.append(procs[-1])
    return procs


def wait_for(condition, procs, root: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for i, p in enumerate(procs):
            assert p.poll() is None, (f"process {i} exited ({p.returncode}) while waiting for {what}:\n"
                                      + (root / f"err{i}.txt").read_text()[-3000:])
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def killed_and_rerun(root: Path, env: dict, started: list) -> dict:
    """The two-process run, interrupted: process 1 stops answering at step 3 (after the step-2
    checkpoint) and is killed; process 0 must exit on its own. The step-2 checkpoint is copied to
    root/one. Then both are started again (while process 0 of the first run, stuck in step 3, waits
    for its end), and process 1 alone gets SIGTERM as the loop reads step 3's batch."""
    first = two_processes(root, env, started, hang_at=2)
    wait_for(lambda: (root / "log1.jsonl.hung").exists() and (root / "run/checkpoints/2").is_dir(), first, root,
             600, "process 1 to reach step 3 with the step-2 checkpoint written")
    first[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    first[1].wait()
    steps_before_rerun = [r["step"] for r in read_metrics(root / "run/metrics.jsonl")]
    shutil.copytree(root / "run", root / "one")
    second = two_processes(root, env, started, term_at=2)
    try:
        rc = first[0].wait(timeout=HEARTBEAT + 60)
    except subprocess.TimeoutExpired:
        rc = None  # still running: hung
    exited_after = time.monotonic() - killed
    rcs = [p.wait(timeout=600) for p in second]
    return {"survivor_rc": rc, "survivor_exited_after": exited_after, "rerun_rcs": rcs,
            "steps_before_rerun": steps_before_rerun}


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """The two-process runs, then the 8-device subprocess's results and the one-device resume of the
    two processes' step-2 checkpoint (root/two/one), these two side by side."""
    root = tmp_path_factory.mktemp("sharded")
    cache = root / "compile_cache"  # the rerun of the two processes reuses the first run's programs
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {XLA_FLAGS}"}
    (root / "two").mkdir()
    started = []
    try:
        # Alone: gloo gives each process 30 s to join a collective the other has started, and a busy
        # machine can hold one process back that long.
        two = killed_and_rerun(root / "two", env, started)
        single = subprocess.Popen([sys.executable, str(CHECK), str(root / "single"), json.dumps(SETTINGS)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**env, "XLA_FLAGS": ""})
        started.append(single)
        with open(root / "two/err_one.txt", "w") as err:
            argv = [sys.executable, "-m", "nemojax.cli", "train", *ARGS, f"--out-dir={root / 'two/one'}"]
            one_device = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                          env={**env, "XLA_FLAGS": XLA_FLAGS})
        started.append(one_device)
        out, err = single.communicate(timeout=900)
        assert single.returncode == 0, err[-4000:]
        two["one_device_rc"] = one_device.wait(timeout=600)
    finally:
        for p in started:
            if p.poll() is None:
                if str(RUN) in p.args:  # hung: its stacks go to its err file (faulthandler)
                    p.send_signal(signal.SIGUSR1)
                    time.sleep(1)
                p.kill()
                p.wait()
    results = json.loads(out.strip().splitlines()[-1])
    return {**results, "root": root, "two": two}


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


# ------------------------------------------------------------------------- training runs
def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def saved_state(run_dir, step: int = 4) -> dict[str, np.ndarray]:
    """The whole train state of a run's checkpoint (params, optimizer, correction biases, step), restored
    onto this process's one device, by key path."""
    tc = TrainConfig.load(Path(run_dir) / "train_config.json")
    like = jax.eval_shape(lambda: loop.init_state(tc, loop.build_model(tc, 256))[2])
    ckpt = Checkpointer(run_dir, create=False)
    state, _ = ckpt.restore(like, step)
    ckpt.close()
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


# Two processes, or a run resumed on another mesh or device count, compute the same sums in another
# order (gloo's all-reduce across processes is not XLA's within one; other meshes split the sums
# elsewhere), so the results agree to float32 rounding, not bit for bit: measured, the losses to 1e-7
# relative and every array of the state to 1.5e-6 of its largest value (5e-6 between the data8 and ep
# runs, whose orders differ from the first step). A wrong data order or a state restored wrong moves
# the next loss by ~1e-2 and the parameters by about lr = 3e-3 (~1e-2 of their largest values).
LOSS_TOL, STATE_TOL = 1e-5, 1e-5


def assert_same_run(run, ref):
    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert max(abs(got[s] - want[s]) / want[s] for s in want) < LOSS_TOL, (got, want)
    a, b = saved_state(run), saved_state(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert np.max(np.abs(a[k] - b[k])) <= STATE_TOL * np.max(np.abs(b[k])), k


def test_trainer_expert_parallel_mesh_matches_data_parallel(multi):
    runs = multi["root"] / "single"
    dp, ep = losses(runs / "data8"), losses(runs / "ep")
    assert multi["trainer_runs"]["ep_traces"] > 0  # the EP run did go through the all-to-all dispatch
    assert sorted(ep) == sorted(dp) == [1, 2, 3, 4]
    assert max(abs(ep[s] - dp[s]) / dp[s] for s in dp) < LOSS_TOL
    last = [read_metrics(runs / name / "metrics.jsonl")[-1] for name in ("data8", "ep")]
    load_keys = [k for k in last[0] if k.startswith("moe_load/")]
    assert load_keys
    assert max(np.max(np.abs(np.subtract(last[0][k], last[1][k]))) for k in load_keys) < 1e-6


def test_two_processes_train_as_one_process_on_8_devices(multi):
    """Two processes x 4 devices (killed after step 2 and rerun) against one process x 8 devices, same mesh."""
    assert multi["two"]["rerun_rcs"] == [130, 130]  # both stopped by the SIGTERM to process 1, after step 4
    assert_same_run(multi["root"] / "two/run", multi["root"] / "single/ep")


def test_each_process_reads_only_its_rows_and_together_they_are_the_batch(multi):
    root = multi["root"] / "two"
    reads = [[json.loads(line) for line in open(root / f"log{i}.jsonl")] for i in range(2)]
    data = {split: loop.make_dataset(TrainConfig(**SETTINGS), split) for split in ("train", "validation")}
    seen = {}
    for i, records in enumerate(reads):
        assert records
        for r in records:
            # devices 0-3 are process 0's: with data outermost in the mesh, it holds the first half of the batch
            assert r["rows"] == list(range(4 * i, 4 * i + 4)), r["rows"]
            seen.setdefault((r["split"], r["step"]), {})[i] = r["inputs"]
    assert {("train", s) for s in range(4)} <= seen.keys() and ("validation", 0) in seen
    for (split, step), by_process in seen.items():
        assert sorted(by_process) == [0, 1], (split, step)  # every batch read by both processes
        together = np.concatenate([by_process[0], by_process[1]])
        np.testing.assert_array_equal(together, data[split].batch(step)["inputs"])


def test_killing_one_process_makes_the_other_exit_with_an_error(multi):
    two = multi["two"]
    assert two["survivor_rc"] not in (None, 0), two
    # JAX's heartbeats notice the dead process within the timeout; the rest is slack for a loaded machine
    assert two["survivor_exited_after"] < HEARTBEAT + 30, two
    assert "another task died" in (multi["root"] / "two/err0.txt").read_text()


def test_rerun_resumes_from_the_last_complete_checkpoint(multi):
    run = multi["root"] / "two/run"
    assert multi["two"]["steps_before_rerun"] == [0, 1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert [(s["start_step"], s.get("resumed_from"), s["end_step"]) for s in summary["segments"]] == [
        (0, None, 2), (2, 2, 4)]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_a_signal_to_one_process_stops_all_after_the_same_step(multi):
    """Process 1 alone got SIGTERM while reading step 3's batch. Stopping by itself, it would have saved
    step 3 and left process 0 waiting in step 4's collectives; instead both learn of it one step later,
    save step 4 together and exit with 130, and process 0's summary names the signal it never got."""
    run = multi["root"] / "two/run"
    assert multi["two"]["rerun_rcs"] == [130, 130]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["step"] == 4
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]


def test_checkpoint_resumes_on_another_mesh(multi):
    runs = multi["root"] / "single"
    assert json.loads((runs / "data8_to_ep/summary.json").read_text())["segments"][-1]["resumed_from"] == 2
    assert_same_run(runs / "data8_to_ep", runs / "data8")


def test_checkpoint_of_two_processes_resumes_on_one_device(multi):
    """The two processes' step-2 checkpoint (8 devices, data=2,fsdp=2,expert=2), resumed by one process on
    one device."""
    run = multi["root"] / "two/one"
    assert multi["two"]["one_device_rc"] == 0, (multi["root"] / "two/err_one.txt").read_text()[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["segments"][-1]["resumed_from"] == 2 and "final_eval" in summary
    assert_same_run(run, multi["root"] / "single/ep")


def test_runtime_flags_need_distributed_and_the_address_a_port(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--process-id", "1", "--heartbeat-timeout", "5", "--out-dir", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "--process-id, --heartbeat-timeout: only with --distributed" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="coordinator_address must be HOST:PORT .*got 'localhost'"):
        distributed.initialize("localhost", 2, 0)  # refused before JAX is touched


def test_resume_with_another_model_or_optimizer_names_what_differs(multi, tmp_path):
    shutil.copytree(multi["root"] / "single/ep", tmp_path / "run")
    tc = TrainConfig(**SETTINGS, out_dir=str(tmp_path / "run"))
    cfg = nj.presets.get("tiny-moe")
    other = cfg.replace_layers({4: dataclasses.replace(cfg.layers[4], num_experts=4)})
    with pytest.raises(ValueError, match=r"model_config.layers\[4\].num_experts: 8 -> 4"):
        loop.train(tc, model_config=other, quiet=True)
    # without gradient clipping the optimizer state has another structure
    with pytest.raises(CheckpointMismatch, match=r"opt_state/.*only in the checkpoint.*grad_clip 1.0 -> 0.0"):
        loop.train(tc.replace(grad_clip=0.0, allow_changes=True), quiet=True)
    assert sorted(os.listdir(tmp_path / "run/checkpoints")) == ["2", "4"]  # not taken for damage, not moved
