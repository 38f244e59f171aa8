"""Blockwise local distillation: the recorded normalised MSE is the NumPy formula on the parent's and the
child's layer contributions (through `replace_layers`), training lowers it for a random linear block,
a vmapped group trains each member as it would train alone, an interrupted run (killed or stopped by
SIGINT) resumes to exactly the uninterrupted result, and a finished run is never retrained."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax as nj
from nemojax.compress.puzzle import bld, library
from nemojax.config import AttentionSpec, LinearSpec, MLPSpec, NoOpSpec, from_pattern
from nemojax.data import make_dataset
from nemojax.nn.layers import LinearMixer

D, STEPS = 32, 12
KW = dict(tokens=STEPS * 2 * 16, lr=3e-3, log_every=4, progress=False)


@pytest.fixture(scope="module")
def parent():
    cfg = from_pattern("-*--", vocab_size=64, hidden_size=D, mlp=MLPSpec(64),
                       attention=AttentionSpec(num_heads=2, num_kv_heads=2, head_dim=16))
    return nj.HybridLM(cfg, rngs=nnx.Rngs(0))


def dataset():
    return make_dataset("induction", seq_len=16, batch_size=2, vocab_size=64)


def random_linear(seed, bias=False):
    spec = LinearSpec(bias=bias)
    return spec, LinearMixer(spec, D, std=0.02, dtype=jnp.float32, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def cands(parent):
    """Three random linear blocks (one group), two MLPs at half width (another group), a no-op and the parent."""
    out = {f"{i}:linear": (i, *random_linear(i)) for i in (0, 2, 3)}
    for i in (0, 3):
        out[f"{i}:mlp_w50"] = (i, *library.prune_mlp(parent.layers[i].mixer, np.arange(0, 64, 2)))
    out["1:noop"] = (1, NoOpSpec(), None)
    out["1:parent"] = (1, parent.cfg.layers[1], parent.layers[1].mixer)
    return out


@pytest.fixture(scope="module")
def grouped(parent, cands, tmp_path_factory):
    out = tmp_path_factory.mktemp("grouped")
    return out, bld.run_bld(parent, cands, dataset(), out, **KW)


def trained(out, key, cands):
    return bld.load_trained(out, key, nnx.clone(cands[key][2]))


def params(module):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


class StopAt:
    """The dataset, with `action()` run once when batch `step` is first drawn (a kill or a signal)."""

    def __init__(self, ds, step, action):
        self.ds, self.step, self.action, self.calls = ds, step, action, 0

    def batch(self, i):
        self.calls += 1
        if i == self.step:
            self.step = None
            self.action()
        return self.ds.batch(i)


def test_record_nmse_is_the_numpy_formula_and_training_lowers_it(parent, cands, grouped):
    out, record = grouped
    assert {k: record[k]["status"] for k in ("1:noop", "1:parent")} == {"1:noop": "skipped", "1:parent": "skipped"}
    heldout = dataset().batch(STEPS)["inputs"]  # the default held-out batch: the stream's next one
    p_states = [np.asarray(s, np.float64) for s in parent.layer_states(jnp.asarray(heldout))]
    for key in ("2:linear", "3:mlp_w50"):
        layer, spec, fresh = cands[key]
        for module, field in ((fresh, "initial_nmse"), (trained(out, key, cands), "final_nmse")):
            c_states = nnx.clone(parent).replace_layers({layer: (spec, module)}).layer_states(jnp.asarray(heldout))
            f_c = np.asarray(c_states[layer + 1], np.float64) - np.asarray(c_states[layer], np.float64)
            f_p = p_states[layer + 1] - p_states[layer]
            np.testing.assert_allclose(record[key][field], np.sum((f_c - f_p) ** 2) / np.sum(f_p ** 2), rtol=1e-4)
        assert record[key]["status"] == "trained" and record[key]["steps"] == STEPS
        assert [s for s, _ in record[key]["loss_curve"]] == [4, 8, 12]
    for key in ("0:linear", "2:linear", "3:linear"):  # random linear blocks: far off the parent, then much closer
        assert record[key]["initial_nmse"] > 10 and record[key]["final_nmse"] < 0.3 * record[key]["initial_nmse"]


def test_a_group_trains_each_member_as_it_would_train_alone(parent, cands, grouped, tmp_path):
    out, _ = grouped
    alone = {key: cands[key] for key in ("2:linear", "3:mlp_w50")}  # one of each group, each a group of one
    bld.run_bld(parent, alone, dataset(), tmp_path, **KW)
    for key in alone:
        for a, b in zip(params(trained(tmp_path, key, cands)), params(trained(out, key, cands)), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_interrupted_runs_resume_to_the_uninterrupted_result(parent, cands, grouped, tmp_path):
    out, record = grouped

    def kill():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):  # killed while drawing step 5: resumes from the save at 3
        bld.run_bld(parent, cands, StopAt(dataset(), 5, kill), tmp_path, save_every=3, **KW)
    assert bld._read_json(tmp_path / bld.RECORD)["2:linear"] | {"loss_curve": None} == {
        "layer": 2, "name": "linear", "status": "running", "steps": 3, "tokens": 3 * 2 * 16, "lr": 3e-3,
        "batch_size": 2, "initial_nmse": record["2:linear"]["initial_nmse"], "final_nmse": None, "loss_curve": None}
    with pytest.raises(ValueError, match="'lr': \\(0.003, 0.001\\)"):
        bld.run_bld(parent, cands, dataset(), tmp_path, save_every=3, **{**KW, "lr": 1e-3})
    # SIGINT while drawing step 7: step 7 completes, the run saves at 8 and returns
    stopped = bld.run_bld(parent, cands, StopAt(dataset(), 7, lambda: os.kill(os.getpid(), signal.SIGINT)),
                          tmp_path, save_every=3, **KW)
    assert stopped["2:linear"]["status"] == "running" and stopped["2:linear"]["steps"] == 8
    resumed = bld.run_bld(parent, cands, dataset(), tmp_path, save_every=3, **KW)
    assert resumed == record
    assert not (tmp_path / bld.RESUME).exists()
    for key in record:
        if record[key]["status"] == "trained":
            for a, b in zip(params(trained(tmp_path, key, cands)), params(trained(out, key, cands)), strict=True):
                np.testing.assert_array_equal(a, b)


def test_a_finished_run_is_not_retrained(parent, cands, grouped):
    out, record = grouped
    weights = sorted((out / "weights").iterdir())
    assert len(weights) == 5
    weights.append(out / bld.RECORD)
    mtimes = [w.stat().st_mtime_ns for w in weights]
    counting = StopAt(dataset(), None, None)
    assert bld.run_bld(parent, cands, counting, out, **KW) == record
    assert counting.calls == 0 and [w.stat().st_mtime_ns for w in weights] == mtimes


def test_load_trained_errors_name_the_key(parent, grouped):
    out, _ = grouped
    with pytest.raises(ValueError, match="'3:linear'.*linear.bias"):
        bld.load_trained(out, "3:linear", random_linear(0, bias=True)[1])
    with pytest.raises(ValueError, match="'3:mlp_w50'.*up_proj.kernel"):
        bld.load_trained(out, "3:mlp_w50", library.prune_mlp(parent.layers[3].mixer, np.arange(8))[1])
    with pytest.raises(ValueError, match="no candidate '2:mlp_w50'"):
        bld.load_trained(out, "2:mlp_w50", parent.layers[2].mixer)
    assert bld.load_trained(out, "1:noop", None) is None


@pytest.mark.parametrize("key, cand, match", [
    ("2:linear", (3, LinearSpec(), None), "'2:linear'.*must be '3:<name>'"),
    ("3:linear", (3, LinearSpec(), None), "'3:linear'.*None exactly when the spec is NoOpSpec"),
    ("7:noop", (7, NoOpSpec(), None), "'7:noop'.*layer must be an int in \\[0, 4\\)"),
])
def test_bad_candidates_are_named(parent, tmp_path, key, cand, match):
    with pytest.raises(ValueError, match=match):
        bld.run_bld(parent, {key: cand}, dataset(), tmp_path, tokens=32)


def test_a_step_takes_the_next_sequences_of_the_stream():
    ds = dataset()
    rows = np.concatenate([ds.batch(i)["inputs"] for i in range(5)])
    stream = bld._Stream(ds, 3)
    for step in (2, 1, 0):
        np.testing.assert_array_equal(stream(step), rows[3 * step:3 * step + 3])
