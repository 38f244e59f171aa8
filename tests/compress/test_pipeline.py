"""`nemojax puzzle` stage by stage on a tiny trained parent: every stage writes what the next reads, and
the child it builds has the parameters the search's cost table promised (param_counts, independently)."""

import json

import numpy as np
import pytest

from nemojax.cli import main
from nemojax.compress.puzzle import bld, pipeline
from nemojax.io.hf import load_pretrained
from nemojax.nn.model import param_counts
from nemojax.train import TrainConfig, train
from nemojax.train.loop import load_run, make_dataset


def layer_params(cfg):
    c = param_counts(cfg)
    return c["total"] - c["embedding"] - c["lm_head"] - cfg.hidden_size  # less the final norm's weight


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("parent")
    train(TrainConfig(preset="tiny-hybrid", seq_len=32, batch_size=4, steps=4, eval_batches=1, eval_every=4,
                      save_every=4, log_every=2, sample_tokens=0, out_dir=str(out)), quiet=True)
    return out


def test_stages_build_a_child_within_the_budget(parent_run, tmp_path, capsys, monkeypatch):
    """Stage by stage through the CLI (`run` chains the same calls; distillation has its own tests)."""
    d = str(tmp_path / "pz")
    for argv in (["library", d, "--parent", str(parent_run), "--kinds", "mlp,mamba,noop", "--calibration-batches", "1"],
                 ["bld", d, "--bld-tokens", "256"],
                 ["score", d, "--eval-batches", "1", "--batch-sizes", "1", "--no-measure"],
                 ["search", d, "--budget", "params=0.6", "--name", "p60"],
                 ["assemble", d, "--search", "p60"]):
        assert main(["puzzle", *argv]) == 0, argv
    d = tmp_path / "pz"
    found = json.loads((d / "search" / "p60.json").read_text())
    best = found["mip"][0]
    assert best["relative"]["params"] <= 0.6 + 1e-9
    child = load_pretrained(d / "child" / "p60", progress=False)
    _, parent, _ = load_run(parent_run)
    assert layer_params(child.cfg) == best["costs"]["params"]
    assert best["relative"]["params"] == pytest.approx(layer_params(child.cfg) / layer_params(parent.cfg))
    assert json.loads((d / "child" / "p60" / "assembly.json").read_text())["keys"] == best["keys"]
    assert set(found["baselines"]) == {"greedy", "max_params", "noop_only", "uniform"}
    assert (d / "scores" / "scores.png").exists() and "child" in capsys.readouterr().out

    # a BLD stopped by a signal (saved, unfinished) ends the command instead of feeding the next stage
    # (`run` first rebuilds the library: no-op candidates on one batch keep that cheap)
    monkeypatch.setattr(bld, "run_bld", lambda *a, **k: {"1:mlp_w50": {"status": "running"}})
    with pytest.raises(SystemExit) as exc:
        main(["puzzle", "run", str(d), "--parent", str(parent_run), "--kinds", "noop", "--calibration-batches", "1",
              "--budget", "params=0.6"])
    assert exc.value.code == 130 and "BLD stopped and saved" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["puzzle", "assemble", "DIR"], "--search: required"),
    (["puzzle", "search", "DIR", "--budget", "speed=0.5"], "NAME one of"),
    (["puzzle", "score", "DIR"], "not a Puzzle directory"),
])
def test_puzzle_cli_errors_name_the_flag(argv, needle, tmp_path, capsys):
    argv = [str(tmp_path / "none") if a == "DIR" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_heldout_batches_and_prompts_are_the_validation_rows_in_order():
    tc = TrainConfig(preset="tiny-hybrid", seq_len=32, batch_size=4)
    ds = make_dataset(tc, "validation")
    for i, b in enumerate(pipeline.heldout_batches(tc, 2, first=1)):
        np.testing.assert_array_equal(b["inputs"], ds.batch(1 + i)["inputs"])
    prompts = pipeline.heldout_prompts(tc, 6, 20, first=2)  # 6 rows: all of batch 2 and two of batch 3
    np.testing.assert_array_equal(prompts, np.concatenate([ds.batch(2)["inputs"], ds.batch(3)["inputs"][:2]])[:, :20])
    assert len({p.tobytes() for p in prompts}) == 6
    with pytest.raises(ValueError, match="length: between 1 and the sequence length 32; got 33"):
        pipeline.heldout_prompts(tc, 2, 33)
