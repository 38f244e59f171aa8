"""Assembly and global distillation of a Puzzle child: the GKD loss against NumPy, a child that is the
parent at zero loss, a distillation run on the trainer that lowers the loss and resumes bit for bit, and
an assembled heterogeneous child (recipes and BLD weights) that round-trips through save_pretrained /
load_pretrained."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax as nj
from nemojax.config import AttentionSpec, LinearSpec, MambaSpec, MLPSpec, NoOpSpec, from_pattern
from nemojax.compress.puzzle import assemble, bld, library
from nemojax.compress.puzzle import distill as gkd
from nemojax.train import TrainConfig, loop
from testutils import interrupt_at

CFG = from_pattern("M-*-", vocab_size=256, hidden_size=32, name="tiny-distill",
                   mamba=MambaSpec(num_heads=2, head_dim=16, n_groups=1, state_size=8, chunk_size=8),
                   attention=AttentionSpec(num_heads=2, num_kv_heads=2, head_dim=16), mlp=MLPSpec(64))


def perturbed(model, scale, seed):
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.map(lambda x: x + scale * rng.normal(size=x.shape).astype(x.dtype),
                                   nnx.state(model, nnx.Param)))
    return model


@pytest.fixture(scope="module")
def parent():
    return perturbed(nj.HybridLM(CFG, rngs=nnx.Rngs(0)), 0.2, 1)


def heterogeneous_child(parent):
    """Layer 0 a no-op, layer 1 an MLP pruned to half its channels, layer 2 attention with its two KV
    heads pooled into one; layer 3 the parent's."""
    return parent.replace_layers({0: (NoOpSpec(), None),
                                  1: library.prune_mlp(parent.layers[1].mixer, np.arange(0, 64, 2)),
                                  2: library.pool_kv_heads(parent.layers[2].mixer, 1)})


TC = TrainConfig(preset="tiny-hybrid", data="text", seq_len=16, batch_size=2, steps=4, warmup_steps=0,
                 save_every=2, eval_every=2, eval_batches=1, log_every=1, sample_tokens=0)


# ------------------------------------------------------------------------------------------ the loss
def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_gkd_loss_equals_numpy():
    rng = np.random.default_rng(0)
    b, t, d, v, n_layers = 2, 5, 8, 11, 3
    hc, hp = rng.normal(size=(2, n_layers, b, t, d))
    zc, zp = 3 * rng.normal(size=(2, b, t, v))
    targets = rng.integers(0, v, (b, t))
    targets[0, :2] = -100
    mask = targets != -100

    cos = sum(np.mean((1 - np.sum(c * p, -1) / np.linalg.norm(c, axis=-1) / np.linalg.norm(p, axis=-1))[mask])
              for c, p in zip(hc, hp))
    lq, lp = np_log_softmax(zc), np_log_softmax(zp)
    kl = np.mean(np.sum(np.exp(lp) * (lp - lq), -1)[mask])
    ce = np.mean(-np.take_along_axis(lq, np.where(mask, targets, 0)[..., None], -1)[..., 0][mask])

    args = (tuple(map(jnp.asarray, hc)), tuple(map(jnp.asarray, hp)), jnp.asarray(zc), jnp.asarray(zp),
            jnp.asarray(mask))
    loss_fn = jax.jit(gkd.gkd_loss, static_argnames="lm")
    loss, terms = loss_fn(*args)
    assert set(terms) == {"cos", "kl"}
    np.testing.assert_allclose([terms["cos"], terms["kl"], loss], [cos, kl, cos + kl], rtol=1e-5)
    loss, terms = loss_fn(*args, lm=True, targets=jnp.asarray(targets))
    np.testing.assert_allclose([terms["cos"], terms["kl"], terms["ce"], loss], [cos, kl, ce, cos + kl + ce],
                               rtol=1e-5)

    with pytest.raises(ValueError, match="targets"):
        gkd.gkd_loss(*args, lm=True)
    with pytest.raises(ValueError, match="child_states has 2 layers and parent_states 3"):
        gkd.gkd_loss(args[0][:2], *args[1:])


def test_a_child_that_is_the_parent_has_zero_loss(parent):
    """The teacher's states and logits line up with the child's layer by layer: a child built from the
    parent option in every layer scores 0 (a teacher state off by one layer would not)."""
    batch = gkd.teacher(parent)(jax.tree.map(jnp.asarray, loop.make_dataset(TC).batch(0)))
    loss_fn = nnx.jit(gkd.gkd_loss_fn)
    same = parent.replace_layers({i: (spec, parent.layers[i]) for i, spec in enumerate(CFG.layers)})
    loss, metrics = loss_fn(same, batch)
    assert float(metrics["cos"]) < 1e-6 and abs(float(metrics["kl"])) < 1e-6 and float(loss) < 2e-6
    lp = np_log_softmax(np.asarray(batch["parent_logits"], np.float64))
    targets = np.asarray(batch["targets"])
    np.testing.assert_allclose(float(metrics["ce"]), -np.mean(np.take_along_axis(lp, targets[..., None], -1)),
                               rtol=1e-5)


# ------------------------------------------------------------------------------------ the trainer
logits_of = nnx.jit(lambda m, t: m(t))


def np_kl(teacher_logits, student_logits):
    lp, lq = np_log_softmax(np.asarray(teacher_logits, np.float64)), np_log_softmax(np.asarray(student_logits, np.float64))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def test_distillation_lowers_the_loss_and_resumes_bit_for_bit(parent, tmp_path):
    child = heterogeneous_child(parent)
    run = dict(steps=4, lr=3e-3, train_config=TC, quiet=True)
    straight = gkd.distill(parent, child, tmp_path / "straight", **run)
    assert straight["step"] == 4 and straight["interrupted"] is None
    ev0, ev1 = straight["initial_eval"], straight["final_eval"]
    assert ev1["gkd"] < 0.9 * ev0["gkd"] and ev1["kl"] < ev0["kl"]
    assert straight["kl_to_parent"] == {"initial": ev0["kl"], "final": ev1["kl"]}
    # the step-0 evaluation is the assembled child's: its KL to the parent, recomputed outside the trainer
    inputs = jnp.asarray(loop.make_dataset(TC, "validation").batch(0)["inputs"])
    np.testing.assert_allclose(ev0["kl"], np_kl(logits_of(parent, inputs), logits_of(child, inputs)), rtol=1e-4)
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert all({"eval_loss", "eval_accuracy", "eval_gkd", "eval_cos", "eval_kl"} <= set(r) for r in records[::2])
    for name in ("loss.png", "summary.json", "model_config.json", "distill_config.json"):
        assert (tmp_path / "straight" / name).exists(), name

    with interrupt_at(2):  # SIGINT while the batch of step 3 (0-based 2) is drawn
        stopped = gkd.distill(parent, child, tmp_path / "resumed", **run)
    assert stopped["interrupted"] == "SIGINT" and stopped["step"] == 3
    with pytest.raises(ValueError, match="lm"):
        gkd.distill(parent, child, tmp_path / "resumed", lm=True, **run)
    # the checkpoint wins over the child given on resume
    other = perturbed(heterogeneous_child(parent), 0.1, 7)
    resumed = gkd.distill(parent, other, tmp_path / "resumed", **run)
    assert resumed["step"] == 4 and resumed["final_eval"] == straight["final_eval"]
    for a, b in zip(_leaves(loop.load_run(tmp_path / "straight")[1]), _leaves(loop.load_run(tmp_path / "resumed")[1]),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def library_entries():
    mlp, attn = CFG.layers[1], CFG.layers[2]
    return [library.Candidate(0, "noop", NoOpSpec(), {"op": "noop"}),
            library.Candidate(0, "parent", CFG.layers[0], {"op": "parent"}),
            library.Candidate(1, "mlp_w50", dataclasses.replace(mlp, intermediate_size=32),
                              {"op": "mlp_channels", "keep": list(range(0, 64, 2))}),
            library.Candidate(2, "attn_kv1", dataclasses.replace(attn, num_kv_heads=1),
                              {"op": "kv_heads", "num_kv_heads": 1}),
            library.Candidate(3, "parent", CFG.layers[3], {"op": "parent"}),
            library.Candidate(3, "linear", LinearSpec(), {"op": "linear_fit"})]


def test_an_assembled_heterogeneous_child_round_trips_through_save_pretrained(parent, tmp_path):
    """assemble_from_dirs builds the child that replace_layers builds from the same recipes, with the
    BLD-trained weights of the candidates BLD trained; saved and loaded, it gives the same logits."""
    keys = ["3:parent", "0:noop", "1:mlp_w50", "2:attn_kv1"]
    inputs = jnp.asarray(loop.make_dataset(TC).batch(0)["inputs"])
    child, record = assemble.assemble_from_dirs(parent, keys, library_entries(), None, out_dir=tmp_path / "child")
    assert [s.kind for s in child.cfg.layers] == ["noop", "mlp", "attention", "mlp"]
    assert record["keys"] == ["0:noop", "1:mlp_w50", "2:attn_kv1", "3:parent"] and record["source"] == ["noop", "recipe", "recipe", "parent"]
    assert record["params"] == {"parent": nj.param_counts(CFG)["total"], "child": nj.param_counts(child.cfg)["total"]}
    np.testing.assert_array_equal(logits_of(child, inputs), logits_of(heterogeneous_child(parent), inputs))
    loaded = nj.load_pretrained(tmp_path / "child", progress=False)
    assert loaded.cfg == child.cfg
    np.testing.assert_array_equal(logits_of(loaded, inputs), logits_of(child, inputs))
    assert json.loads((tmp_path / "child" / assemble.ASSEMBLY_NAME).read_text()) == record

    entries = {c.key: library.materialize(parent, c) for c in library_entries()[2:4]}
    bld.run_bld(parent, {"1:mlp_w50": entries["1:mlp_w50"]}, loop.make_dataset(TC), tmp_path / "bld", tokens=64,
                lr=1e-2, progress=False)
    child, record = assemble.assemble_from_dirs(parent, keys, library_entries(), tmp_path / "bld")
    assert record["source"] == ["noop", "bld", "recipe", "parent"]
    trained = bld.load_trained(tmp_path / "bld", "1:mlp_w50", entries["1:mlp_w50"][2])
    np.testing.assert_array_equal(child.layers[1].mixer.up_proj.kernel[...], trained.up_proj.kernel[...])
    assert not np.array_equal(trained.up_proj.kernel[...], library.materialize(parent, library_entries()[2])[2]
                              .up_proj.kernel[...])


def test_assembly_errors_name_the_key_or_layer(parent):
    entries = library_entries()
    for keys, match in ((["0:noop", "1:mlp_w50", "2:attn_kv1", "3:mlp_w10"], "'3:mlp_w10' is not in the library"),
                        (["0:noop", "0:parent", "1:mlp_w50", "2:attn_kv1", "3:parent"], "layer 0 is chosen twice"),
                        (["0:noop", "1:mlp_w50", "3:parent"], r"no candidate for layers \[2\]"),
                        (["0:noop", "1:mlp_w50", "2:attn_kv1", "3:linear"], r"tokens: .* layers \[3\]")):
        with pytest.raises(ValueError, match=match):
            assemble.assemble_from_dirs(parent, keys, entries)


def test_distill_errors_name_the_argument(parent, tmp_path):
    with pytest.raises(ValueError, match="train_config: required"):
        gkd.distill(parent, parent, tmp_path / "a", steps=2, lr=1e-3)
    shallow = nnx.eval_shape(lambda: nj.HybridLM(from_pattern("M-*", vocab_size=256, hidden_size=32, mamba=CFG.layers[0],
                                                              attention=CFG.layers[2], mlp=CFG.layers[1]),
                                                 rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"layer count \(4\); got 256 and 3"):
        gkd.distill(parent, shallow, tmp_path / "a", steps=2, lr=1e-3, train_config=TC)
    assert not (tmp_path / "a").exists()
