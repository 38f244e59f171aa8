"""Global distillation of a Puzzle child: the GKD loss against NumPy, a child that is the parent at zero
loss, a distillation run on the trainer that lowers the loss and resumes bit for bit, and a heterogeneous
child that round-trips through save_pretrained / load_pretrained."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax as nj
from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, NoOpSpec, from_pattern
from nemojax.compress.puzzle import distill as gkd
from nemojax.compress.puzzle import library
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


def test_a_heterogeneous_child_round_trips_through_save_pretrained(parent, tmp_path):
    child = heterogeneous_child(parent)
    assert [s.kind for s in child.cfg.layers] == ["noop", "mlp", "attention", "mlp"]
    nj.save_pretrained(child, tmp_path / "child")
    loaded = nj.load_pretrained(tmp_path / "child", progress=False)
    assert loaded.cfg == child.cfg
    inputs = jnp.asarray(loop.make_dataset(TC).batch(0)["inputs"])
    np.testing.assert_array_equal(logits_of(loaded, inputs), logits_of(child, inputs))
