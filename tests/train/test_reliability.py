"""Nothing lost, nothing silent: damaged checkpoints are detected and skipped (never deleted), a diverged
run stops with an error, a resume cannot silently change the run, a failed start writes nothing, and
the run's records (metrics, summary times) stay consistent across re-runs."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemojax.io.checkpoint import Checkpointer, CheckpointError
from nemojax.train import TrainConfig, loop, memory
from nemojax.train.config import FIXED_ON_RESUME, FREE_ON_RESUME
from nemojax.train.sharding import fsdp_replicated
from testutils import compile_cache


@pytest.fixture(scope="module", autouse=True)
def compiled_once(tmp_path_factory):
    """The runs here share programs (every run's eval step, the resumed runs' state checksums): each is
    compiled once and loaded from the cache after."""
    with compile_cache(tmp_path_factory.mktemp("compile_cache")):
        yield


def tiny(out_dir, **kw):
    base = dict(preset="tiny-hybrid", data="text", seq_len=32, batch_size=2, steps=4, warmup_steps=1, save_every=2,
                eval_every=2, eval_batches=1, log_every=1, sample_tokens=0, out_dir=str(out_dir))
    base.update(kw)
    return TrainConfig(**base)


def _leaves(tree):
    return jax.tree.leaves(jax.tree.map(np.asarray, tree))


def _damage_data(step_dir, seed=0):
    """Overwrites a region in the middle of the largest array-data file with random bytes."""
    files = sorted(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)
    data = bytearray(open(files[-1], "rb").read())
    mid = len(data) // 2
    data[mid:mid + 64] = np.random.default_rng(seed).bytes(64)
    open(files[-1], "wb").write(bytes(data))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4, started in a directory where a run killed
    before its first checkpoint left a step-0 metrics record."""
    out = tmp_path_factory.mktemp("run") / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss": 9.9}) + "\n")
    tc = tiny(out)
    summary = loop.train(tc, quiet=True)
    return tc, summary


def copy_of(run, tmp_path):
    tc, _ = run
    shutil.copytree(tc.out_dir, tmp_path / "copy")
    return tc.replace(out_dir=str(tmp_path / "copy"))


def test_metrics_have_one_record_per_step(run):
    tc, summary = run
    steps = [json.loads(line)["step"] for line in open(os.path.join(tc.out_dir, "metrics.jsonl"))]
    assert steps == [0, 1, 2, 3, 4]
    assert summary["segments"] == [{"start_step": 0, "end_step": 4, "seconds": summary["seconds_total"],
                                    "interrupted": None}]


def test_checksums_catch_damaged_array_data(tmp_path):
    state = {"a": jnp.arange(50_000, dtype=jnp.float32) / 7, "step": jnp.zeros((), jnp.int32)}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, state, {"step": 3})
    ckpt.wait()
    _damage_data(tmp_path / "checkpoints" / "3")
    with pytest.raises(CheckpointError, match=r"checkpoints/3 is damaged: 1 array.*\['a'\].*available steps: \[3\]"):
        Checkpointer(tmp_path).restore(state)
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 7 .*available steps: \[3\]"):
        Checkpointer(tmp_path).restore(state, 7)


def test_damaged_latest_checkpoint_falls_back_and_keeps_it(run, tmp_path, monkeypatch, capsys):
    tc = copy_of(run, tmp_path)
    _damage_data(f"{tc.out_dir}/checkpoints/4")
    # compilation must happen before the progress bar starts, or the bar times it as a step
    compiles, bar = [], {"open": False}
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if bar["open"] and "backend_compile" in name else None)

    class Bar(loop.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bar["open"] = True

        def close(self):
            bar["open"] = False
            super().close()

    monkeypatch.setattr(loop, "tqdm", Bar)
    summary = loop.train(tc, quiet=True)
    err = capsys.readouterr().err
    assert "checkpoint step 4 skipped" in err and "damaged" in err and "damaged_checkpoints" in err
    assert compiles == []
    assert summary["step"] == 4 and summary["segments"][-1]["resumed_from"] == 2
    assert summary["segments"][-1]["skipped_checkpoints"] == [4]
    assert len(summary["segments"]) == 2  # the original run's segment is kept beside the new one
    assert summary["seconds_total"] == pytest.approx(sum(s["seconds"] for s in summary["segments"]))
    assert sorted(os.listdir(f"{tc.out_dir}/damaged_checkpoints/4")) == sorted(
        os.listdir(f"{run[0].out_dir}/checkpoints/4"))  # moved whole, not deleted
    # steps 3-4 re-trained from step 2 give the original run's step-4 state bit for bit
    _, m1, _ = loop.load_run(run[0].out_dir)
    _, m2, _ = loop.load_run(tc.out_dir)
    for a, b in zip(_leaves(nnx.state(m1)), _leaves(nnx.state(m2)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_intact_checkpoint_names_each(run, tmp_path):
    tc = copy_of(run, tmp_path)
    for step in (2, 4):
        _damage_data(f"{tc.out_dir}/checkpoints/{step}")
    with pytest.raises(CheckpointError, match=r"(?s)no checkpoint .* restores intact.*step 4: .*step 2: "):
        loop.train(tc, quiet=True)
    assert sorted(os.listdir(f"{tc.out_dir}/checkpoints")) == ["2", "4"]


def test_resume_with_changed_schedule_is_refused_unless_allowed(run, tmp_path, capsys):
    tc = copy_of(run, tmp_path)
    with pytest.raises(ValueError, match=r"changed settings \(steps 4 -> 6, lr 0.003 -> 0.001\).*--allow-changes"):
        loop.train(tc.replace(steps=6, lr=1e-3), quiet=True)
    with pytest.raises(ValueError, match=r"steps 3 is below the step to resume from .* \(4\)"):
        loop.train(tc.replace(steps=3, allow_changes=True), quiet=True)
    summary = loop.train(tc.replace(steps=6, allow_changes=True, resume_step=2), quiet=True)
    assert "checkpoint step 4 skipped" in capsys.readouterr().err
    assert summary["step"] == 6
    assert summary["config_changes"] == [{"step": 2, "changed": {"steps": [4, 6]}}]
    assert os.listdir(f"{tc.out_dir}/superseded_checkpoints") == ["4"]
    assert TrainConfig.load(f"{tc.out_dir}/train_config.json").steps == 6


def test_rerun_of_finished_run_keeps_the_times(run, tmp_path):
    tc = copy_of(run, tmp_path)
    again = loop.train(tc, quiet=True)
    assert again["segments"] == run[1]["segments"]
    assert again["seconds_total"] == pytest.approx(run[1]["seconds_total"])


def test_resume_fields_are_classified():
    fields = set(TrainConfig.__dataclass_fields__)
    assert not set(FIXED_ON_RESUME) & set(FREE_ON_RESUME)
    assert set(FIXED_ON_RESUME) | set(FREE_ON_RESUME) <= fields


def test_failed_start_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="data path"):
        loop.train(tiny(tmp_path / "a", data="file", data_path=str(tmp_path / "missing.txt")), quiet=True)
    with pytest.raises(ValueError, match="mesh"):
        loop.train(tiny(tmp_path / "b", mesh="data=3"), quiet=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_divergence_stops_with_the_step_and_saves_nothing_diverged(tmp_path, capsys):
    from nemojax.cli import main

    out = tmp_path / "div"
    rc = main(["train", "--preset", "tiny-hybrid", "--steps", "6", "--seq-len", "32", "--batch-size", "2",
               "--eval-batches", "1", "--sample-tokens", "0", "--save-every", "1", "--lr", "1e30",
               "--warmup-steps", "0", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "training diverged at step" in err and "--lr" in err
    step = int(err.split("diverged at step ")[1].split(":")[0])
    assert Checkpointer(out).steps() == list(range(1, step))  # the diverged step was not saved


def test_memory_estimate_bounds_the_real_state_and_refuses_big_presets(tmp_path, monkeypatch):
    tc = tiny(tmp_path / "m")
    model = loop.build_model(tc, 256)
    state = loop.init_state(tc, model)[2]
    real = sum(x.nbytes for x in jax.tree.leaves(state))
    est = memory.estimate(tc, model.cfg, jax.eval_shape(lambda: state), None)
    params = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
    assert est["per_device"] >= real + params  # state and a gradient per parameter, at least

    monkeypatch.setattr(memory, "available", lambda: (24 * memory.GiB, "24.0 GiB of host memory"))
    with pytest.raises(ValueError, match=r"needs at least \d+\.\d GiB .* 24.0 GiB .*--skip-memory-check"):
        loop.train(tiny(tmp_path / "big", preset="nemotron-h-8b"), quiet=True)
    assert not (tmp_path / "big").exists()


def test_fsdp_names_the_matrices_it_replicates():
    params = nnx.state(loop.build_model(tiny("unused"), 256), nnx.Param)
    mesh = jax.sharding.AbstractMesh((1, 3, 1), ("data", "fsdp", "expert"))
    expected = [f"{'/'.join(map(str, path))} {tuple(v.shape)}" for path, v in nnx.to_flat_state(params)
                if path[-1] in ("kernel", "embeddings", "lm_head", "gate_weight") and all(d % 3 for d in v.shape)]
    assert expected and fsdp_replicated(params, mesh) == expected
    assert fsdp_replicated(params, jax.sharding.AbstractMesh((3, 1, 1), ("data", "fsdp", "expert"))) == []


def test_train_config_load_refuses_unknown_fields(tmp_path):
    path = tmp_path / "train_config.json"
    TrainConfig(steps=5).save(path)
    assert TrainConfig.load(path) == TrainConfig(steps=5)
    raw = json.loads(path.read_text())
    raw["stepz"] = 7
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['stepz'\]"):
        TrainConfig.load(path)
