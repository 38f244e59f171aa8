"""`nemojax fuse` stage by stage on a tiny trained parent with runs of MLP layers: each stage's files hold
what the library functions compute on the same held-out batches, the fused model is the fusion applied
directly, its parameter count the closed form, and the distillation starts from the KL that `apply`
reported."""

import json

import numpy as np
import pytest
from flax import nnx

from nemojax.cli import main
from nemojax.compress import fusion
from nemojax.compress.fusion import pipeline
from nemojax.compress.puzzle.pipeline import heldout_batches
from nemojax.compress.puzzle.score import compare
from nemojax.config import AttentionSpec, MLPSpec, from_pattern
from nemojax.io.hf import load_pretrained
from nemojax.nn.model import param_counts
from nemojax.train import TrainConfig, train
from nemojax.train.loop import load_run

D = 32
# attention rather than Mamba between the MLP runs: the same stages at a fraction of the compile time
CFG = from_pattern("*---*--", vocab_size=256, hidden_size=D, name="tiny-fusion",
                   attention=AttentionSpec(num_heads=2, num_kv_heads=2, head_dim=16), mlp=MLPSpec(64))
MLPS = [k for k, s in enumerate(CFG.layers) if s.kind == "mlp"]


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("parent")
    train(TrainConfig(seq_len=32, batch_size=4, steps=4, eval_batches=1, eval_every=4, save_every=4, log_every=2,
                      sample_tokens=0, out_dir=str(out)), model_config=CFG, quiet=True)
    return out


@pytest.fixture(scope="module")
def parent(parent_run):
    tc, model, _ = load_run(parent_run)
    return model, heldout_batches(tc, 1)


@pytest.fixture(scope="module")
def deps_dir(parent_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("fusion") / "fu"
    assert main(["fuse", "deps", str(d), "--parent", str(parent_run), "--eval-batches", "1"]) == 0
    return d


def fuse_cli(*argv):
    assert main(["fuse", *map(str, argv)]) == 0, argv


def test_deps_saves_the_matrix_and_statistics_of_the_held_out_batches(deps_dir, parent):
    model, batches = parent
    saved = json.loads((deps_dir / "dependency.json").read_text())
    M = fusion.dependency_matrix(model, batches, progress=False)
    got = np.array(saved["matrix"], np.float64)  # null -> NaN
    np.testing.assert_allclose(got, M, rtol=1e-6, atol=1e-9)  # NaN in the same places
    assert np.isfinite(got[np.triu_indices(len(CFG.layers), 1)]).all() and np.isnan(got[np.tril_indices(7)]).all()
    for name, values in fusion.residual_stats(model, batches).items():
        np.testing.assert_allclose(np.array(saved["stats"][name], np.float64), values, rtol=1e-6)
    assert saved["pattern"] == CFG.pattern and (deps_dir / "dependency.png").stat().st_size > 1000
    state = json.loads((deps_dir / "fusion.json").read_text())
    assert state["stages"]["deps"] == {"eval_batches": 1, "layers": None}


def pair_stats(M, start, stop):
    """Max and sum of M[a, b] over a < b in [start, stop), by a loop."""
    values = [M[a, b] for a in range(start, stop) for b in range(a + 1, stop) if np.isfinite(M[a, b])]
    return max(values), sum(values)


@pytest.mark.parametrize("flags", [["--keep-last"], []])
def test_plan_is_ffn_runs_of_the_saved_matrix(deps_dir, flags, capsys):
    M, _ = pipeline.load_dependency(deps_dir)
    threshold = float(np.median([M[a, b] for a in MLPS for b in MLPS if a < b]))
    fuse_cli("plan", deps_dir, "--threshold", threshold, *flags)
    plan = json.loads((deps_dir / "plan.json").read_text())
    expected = fusion.ffn_runs(CFG, M, threshold=threshold, leave_out_last=not flags)
    assert [(r["start"], r["stop"]) for r in plan["runs"]] == expected
    for r in plan["runs"]:
        assert r["op"] == "fuse" and r["kinds"] == [s.kind for s in CFG.layers[r["start"]:r["stop"]]]
        assert (r["max_dependency"], r["sum_dependency"]) == pytest.approx(pair_stats(M, r["start"], r["stop"]))
    out = capsys.readouterr().out
    assert f"{len(expected)} run(s)" in out and all(f"{a}:{b}" in out for a, b in expected)


def test_plan_of_block_windows(deps_dir):
    M, _ = pipeline.load_dependency(deps_dir)
    fuse_cli("plan", deps_dir, "--blocks", 2, "--count", 2)
    plan = json.loads((deps_dir / "plan.json").read_text())
    assert [(r["start"], r["stop"]) for r in plan["runs"]] == fusion.block_windows(CFG, M, size=2, count=2)
    assert {r["op"] for r in plan["runs"]} == {"parallelize"} and len(plan["runs"]) == 2


def assert_same_weights(a, b):
    """Same parameters at the same paths (with equal configs: the same model)."""
    flat_a, flat_b = (dict(nnx.to_flat_state(nnx.state(m, nnx.Param))) for m in (a, b))
    assert flat_a.keys() == flat_b.keys()
    for path, v in flat_a.items():
        np.testing.assert_array_equal(v.get_value(), flat_b[path].get_value(), err_msg=str(path))


def test_apply_fuses_the_planned_runs(deps_dir, parent, capsys):
    model, batches = parent
    fuse_cli("plan", deps_dir, "--threshold", 0)  # no two layers are exactly independent: nothing to fuse
    with pytest.raises(SystemExit) as exc:
        main(["fuse", "apply", str(deps_dir)])
    assert exc.value.code == 2 and "plan.json holds no runs" in capsys.readouterr().err
    fuse_cli("plan", deps_dir, "--threshold", 2, "--keep-last")  # a cosine distance is at most 2: every run
    fuse_cli("apply", deps_dir, "--norm", "fold", "--eval-batches", 1)
    runs = [(1, 4), (5, 7)]
    child = load_pretrained(deps_dir / "fused", progress=False)
    direct = fusion.fuse(fusion.fuse(model, 1, 4, norm="fold"), 5, 7, norm="fold")
    assert child.cfg == direct.cfg and child.cfg.pattern == "*-..*-."
    assert_same_weights(child, direct)
    record = json.loads((deps_dir / "fused" / pipeline.SURGERY).read_text())
    assert [(r["start"], r["stop"], r["op"]) for r in record["runs"]] == [(a, b, "fuse") for a, b in runs]
    # one pre-norm weight per fused run instead of one per layer; depth 7 -> 4
    assert record["params"]["fused"]["total"] == param_counts(CFG)["total"] - D * sum(b - a - 1 for a, b in runs)
    assert record["sequential_layers"] == {"parent": 7, "fused": 4}
    assert record["heldout"]["fused"] == pytest.approx(compare(model, child, batches), rel=1e-5)
    assert record["heldout"]["fused"]["kl"] > 0 and record["heldout"]["parent"]["kl"] == pytest.approx(0, abs=1e-6)
    out = capsys.readouterr().out
    assert "*---*-- -> *-..*-." in out and f"KL to parent {record['heldout']['fused']['kl']:.4f}" in out


def test_apply_runs_override_the_plan_and_parallelise_mixed_layers(deps_dir, parent):
    model, batches = parent
    fuse_cli("apply", deps_dir, "--runs", "0:2,5:7", "--eval-batches", 1)
    child = load_pretrained(deps_dir / "fused", progress=False)
    direct = fusion.fuse(fusion.parallelize(model, 0, 2), 5, 7, norm="last")
    assert child.cfg == direct.cfg and child.cfg.pattern == "P.--*-."
    assert_same_weights(child, direct)
    record = json.loads((deps_dir / "fused" / pipeline.SURGERY).read_text())
    assert record["source"] == "runs" and [r["op"] for r in record["runs"]] == ["parallelize", "fuse"]


def test_run_distils_from_the_kl_apply_measured(parent_run, tmp_path, capsys):
    """`run` chains every stage; the distillation's initial held-out KL (the trainer's evaluation on the
    parent run's validation batches) is the KL `apply` measured with `compare` on the same batches."""
    d = tmp_path / "fu"
    fuse_cli("run", d, "--parent", parent_run, "--eval-batches", 1, "--threshold", 2, "--distill-steps", 2)
    record = json.loads((d / "fused" / pipeline.SURGERY).read_text())
    assert [(r["start"], r["stop"]) for r in record["runs"]] == [(1, 3)]  # the last MLP of each stretch left out
    summary = json.loads((d / "distill" / "summary.json").read_text())
    assert summary["kl_to_parent"]["initial"] == pytest.approx(record["heldout"]["fused"]["kl"], rel=1e-4)
    assert summary["step"] == 2 and set(json.loads((d / "fusion.json").read_text())["stages"]) == set(pipeline.STAGES)
    assert "KL to parent final" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["plan", "NEW", "--threshold", "0.1"], "not an FFN Fusion directory"),
    (["plan", "DIR", "--threshold", "0.1"], "run `nemojax fuse deps"),
    (["apply", "DIR"], "run `nemojax fuse plan"),
    (["distill", "DIR"], "run `nemojax fuse apply"),
    (["plan", "DIR"], "--threshold or --blocks"),
    (["plan", "DIR", "--threshold", "0.1", "--blocks", "2"], "--threshold or --blocks"),
    (["plan", "DIR", "--threshold", "0.1", "--count", "2"], "--count: only with --blocks"),
    (["plan", "DIR", "--blocks", "1"], "--blocks"),
    (["apply", "DIR", "--runs", "1-3"], "--runs"),
    (["apply", "DIR", "--runs", "3:1"], "--runs"),
    (["apply", "DIR", "--runs", "1:3,2:4"], "--runs: runs overlap"),
    (["apply", "DIR", "--norm", "middle"], "--norm"),
    (["apply", "DIR", "--runs", "0:2", "--norm", "fold"], "--norm: every run is parallelised"),
    (["deps", "DIR", "--layers", "1"], "--layers"),
    (["run", "DIR", "--threshold", "0.1"], "--parent: required"),
    # `run` checks the later stages' flags before it measures anything
    (["run", "DIR", "--parent", "PARENT"], "--threshold or --blocks"),
    (["run", "DIR", "--parent", "PARENT", "--blocks", "2", "--keep-last"], "--keep-last: only with --threshold"),
    (["run", "DIR", "--parent", "PARENT", "--threshold", "-1"], "--threshold: a cosine distance"),
    (["run", "DIR", "--parent", "PARENT", "--threshold", "0.1", "--runs", "5:9"], "--runs: each run is START:STOP"),
])
def test_fuse_cli_errors_name_the_flag(argv, needle, parent_run, tmp_path, capsys):
    d = tmp_path / "fu"
    pipeline.init_directory(d, parent_run)
    argv = [{"NEW": str(tmp_path / "none"), "DIR": str(d), "PARENT": str(parent_run)}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(["fuse", *argv])
    assert exc.value.code == 2 and needle in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == [pipeline.STATE]  # refused before writing anything
