"""A model whose every layer differs (widths, KV heads, windows, expert counts, top-k, routing segments,
no-op, linear and parallel layers) is an ordinary model: its config round-trips through the native JSON, and it counts its
parameters, runs cached decode, saves and loads, shards, trains, checkpoints and resumes bit for bit.
Also: the layer registry, `replace_layers` surgery, `layer_states` and the pluggable training loss."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

import nemojax as nj
from nemojax.config import (AttentionSpec, LinearSpec, MambaSpec, MLPSpec, ModelConfig, MoESpec, NoOpSpec,
                            ParallelSpec, SPEC_TYPES)
from nemojax.io.hf import NATIVE_CONFIG_NAME
from nemojax.nn.registry import KINDS, param_rule
from nemojax.nn.ffn import configure_moe
from nemojax.train import TrainConfig, loop
from nemojax.train.sharding import param_specs
from nemojax.train.step import make_eval_step, make_train_step
from nemojax.train import losses
from testutils import closed_form_counts

D = 32
LAYERS = (
    MambaSpec(num_heads=4, head_dim=8, n_groups=2, state_size=8, chunk_size=8),
    MLPSpec(intermediate_size=48, bias=True),
    AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8),
    MoESpec(num_experts=8, top_k=2, intermediate_size=16, shared_intermediate_size=24),
    NoOpSpec(),
    MambaSpec(num_heads=2, head_dim=16, n_groups=1, state_size=4, conv_kernel=3, chunk_size=4, proj_bias=True),
    AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=8, sliding_window=5),
    LinearSpec(bias=True),
    MoESpec(num_experts=4, top_k=1, intermediate_size=8, latent_size=16, routed_scaling_factor=2.0),
    MLPSpec(intermediate_size=12),
    LinearSpec(),
    # full-block parallel: windowed attention, a linear map and a segment-routed MoE read one input
    ParallelSpec((AttentionSpec(num_heads=2, num_kv_heads=2, head_dim=8, sliding_window=3), LinearSpec(),
                  MoESpec(num_experts=6, top_k=3, intermediate_size=8, shared_intermediate_size=8,
                          segments=((4, 2), (2, 1))))),
)
CFG = ModelConfig(vocab_size=256, hidden_size=D, layers=LAYERS, mtp_layers=(NoOpSpec(), MLPSpec(20)), mtp_depth=1,
                  name="every-layer-differs")


def scaled(model, seed=1):
    """Weights bumped so that every layer visibly changes the logits (tiny init hides mistakes)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2
                                                   else x for x, k in zip(leaves, keys)]))
    return model


@pytest.fixture(scope="module")
def model():
    # built under one jit: eagerly, every new parameter shape is a compile of its own (~25 s on a CPU)
    return nnx.jit(lambda: scaled(nj.HybridLM(CFG, rngs=nnx.Rngs(0))))()


logits_of = nnx.jit(lambda m, t: m(t))
logits_and_mtp_of = nnx.jit(lambda m, t: (m(t), m.mtp_logits(t)[0]))


def tokens(b=2, length=19, seed=3):
    return jax.random.randint(jax.random.key(seed), (b, length), 0, CFG.vocab_size, jnp.int32)


# ------------------------------------------------------------------------------------------- config
def test_every_layer_kind_is_registered_and_in_the_test_model():
    assert set(KINDS) == set(SPEC_TYPES)
    assert {type(s) for s in LAYERS} == set(SPEC_TYPES)
    assert len(set(LAYERS)) == len(LAYERS) and CFG.pattern == "M-*E.M*LE-LP"  # every layer differs


def test_native_json_round_trip_is_lossless_and_hf_refuses_with_the_reason(tmp_path):
    text = CFG.to_json()
    json.loads(text)  # strict JSON: infinities are strings
    assert "Infinity" not in text
    back = ModelConfig.from_json(text)
    assert back == CFG and back.layers[0].dt_limit == (0.0, math.inf)
    CFG.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == CFG
    with pytest.raises(ValueError, match="no linear / noop / parallel layers"):
        CFG.to_hf()
    segmented = ModelConfig(vocab_size=8, hidden_size=D, layers=(LAYERS[11].branches[2],))
    with pytest.raises(ValueError, match="routes all of a layer's experts together"):
        segmented.to_hf()
    uniform = nj.presets.get("tiny-latent-mtp")
    assert ModelConfig.from_json(uniform.to_json()) == uniform == ModelConfig.from_hf(uniform.to_hf())


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["layers"][1].update(kind="conv"), "layers[1]: unknown layer kind 'conv'"),
    (lambda d: d["layers"][2].update(num_heads="4"), "layers[2].num_heads: expected int"),
    (lambda d: d["layers"][0].update(heads=4), "layers[0] (mamba): unknown field(s) ['heads']"),
    (lambda d: d["layers"][2].update(num_kv_heads=3), "layers[2]: attention num_heads=4 must be divisible"),
    (lambda d: d["layers"][1].pop("intermediate_size"), "layers[1] (mlp)"),
    (lambda d: d["layers"][11].update(branches=d["layers"][11]["branches"][:1]), "layers[11].branches must be a tuple of at least 2"),
    (lambda d: d["layers"][11]["branches"].append({"kind": "noop"}), "layers[11].branches[3]: expected one of"),
    (lambda d: d["layers"][11]["branches"][2].update(segments=[[4, 2], [2, 2]]), "must add up to num_experts=6"),
    (lambda d: d["layers"][11]["branches"][2].update(segments=[[4, 5], [2, -2]]), "0 < top_k <= num_experts"),
    (lambda d: d.pop("hidden_size"), "missing required field(s) ['hidden_size']"),
    (lambda d: d.update(version=7), "version 7"),
    (lambda d: d.update(format="hf"), "not a native nemojax model config"),
])
def test_bad_native_config_names_the_field(mutate, needle):
    d = CFG.to_dict()
    mutate(d)
    with pytest.raises(ValueError) as err:
        ModelConfig.from_dict(d)
    assert needle in str(err.value)


def test_param_counts_match_theclosed_form_counts():
    c = nj.param_counts(CFG)
    assert (c["total"], c["active"]) == closed_form_counts(CFG)
    model = nnx.eval_shape(lambda: nj.HybridLM(CFG, rngs=nnx.Rngs(0)))
    n_all = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert n_all == c["total"] + c["mtp"] and c["mtp"] == 2 * D + 2 * D * D + D + 2 * D * 20 + D


# ------------------------------------------------------------------------------------------ forward
def test_layer_states_chain_and_every_layer_matters(model):
    t = tokens()
    states, final = nnx.jit(lambda m, t: (m.layer_states(t), m.hidden_states(t)[0]))(model, t)
    assert len(states) == len(LAYERS) + 1
    np.testing.assert_allclose(states[-1], final, rtol=1e-6)
    # each block applied on its own to the recorded input (one compile for all blocks, not one per block)
    outputs = nnx.jit(lambda m, states: [block(x)[0] for block, x in zip(m.layers, states)])(model, states[:-1])
    for i in range(len(LAYERS)):
        np.testing.assert_allclose(outputs[i], states[i + 1], rtol=1e-5, atol=1e-5)
        changed = float(jnp.max(jnp.abs(states[i + 1] - states[i])))
        assert (changed == 0.0) == isinstance(LAYERS[i], NoOpSpec), i


def test_cached_prefill_and_decode_reproduce_the_full_forward(model):
    t = tokens(length=19)  # windows of 5, chunks of 4 and 8, partial last chunk
    full = logits_of(model, t)
    cache = model.init_cache(t.shape[0], t.shape[1])
    assert [c is None for c in cache["layers"]] == [
        not isinstance(s, (MambaSpec, AttentionSpec, ParallelSpec)) for s in LAYERS]
    cached_forward = nnx.jit(lambda m, x, c: m.forward(x, c))
    pieces = []
    # prefill, a cached multi-token forward of the same length (one compile for both; it crosses the chunk
    # boundaries at 8 and 12), then token-by-token decode
    for start, stop in [(0, 7), (7, 14), *((i, i + 1) for i in range(14, 19))]:
        logits, cache = cached_forward(model, t[:, start:stop], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=2e-5, atol=2e-5)
    out = nj.generate(model, t[:, :7], max_new_tokens=13)  # 20 tokens: the oracle below reuses `full`'s compile
    np.testing.assert_array_equal(out[:, :7], t[:, :7])
    greedy = jnp.argmax(logits_of(model, out[:, :19])[:, 6:], -1)  # what a full forward picks at each step
    np.testing.assert_array_equal(out[:, 7:], greedy)


def test_save_and_load_give_identical_logits(model, tmp_path):
    nj.save_pretrained(model, tmp_path)
    assert (tmp_path / NATIVE_CONFIG_NAME).exists() and not (tmp_path / "config.json").exists()
    loaded = nj.load_pretrained(tmp_path, progress=False)
    assert loaded.cfg == CFG
    t = tokens()
    for a, b in zip(logits_and_mtp_of(loaded, t), logits_and_mtp_of(model, t), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_uniform_model_still_writes_the_hf_config(tmp_path):
    model = nj.HybridLM(nj.presets.get("tiny-moe"), rngs=nnx.Rngs(0))
    nj.save_pretrained(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert ModelConfig.from_hf(hf) == model.cfg == ModelConfig.load(tmp_path / NATIVE_CONFIG_NAME)


def test_sharding_rules_cover_every_parameter_of_every_kind(model):
    mesh = AbstractMesh((1, 2, 2), ("data", "fsdp", "expert"))
    specs = dict(nnx.to_flat_state(param_specs(nnx.state(model), mesh)))
    by_name = {"/".join(map(str, p)): s.get_value() for p, s in specs.items()}
    assert by_name["layers/3/mixer/up_proj"] == P("expert", "fsdp", None)  # [8, 32, 16]: experts, then the larger dim
    assert by_name["layers/8/mixer/up_proj"][0] == "expert"  # the 4-expert layer too
    assert by_name["layers/7/mixer/linear/kernel"] == P("fsdp", None)
    assert by_name["layers/7/mixer/linear/bias"] == P()
    assert by_name["layers/0/mixer/A_log"] == P()
    with pytest.raises(ValueError, match="no parameter rule for 'layers/3/mixer/mystery'"):
        param_rule(["layers", "3", "mixer", "mystery"])


# ------------------------------------------------------------------------------------------ surgery
def test_replace_layers_keeps_config_and_layers_in_agreement(model):
    t = tokens()
    child = model.replace_layers({1: (NoOpSpec(), None), 9: (LinearSpec(bias=True), None)}, rngs=nnx.Rngs(5))
    assert child.cfg.pattern == "M.*E.M*LELLP" and model.cfg == CFG  # the parent is unchanged
    assert nj.param_counts(child.cfg)["total"] == closed_form_counts(child.cfg)[0]
    # untouched layers share the parent's arrays, but not its Variables
    assert child.layers[0].mixer.in_proj.kernel[...] is model.layers[0].mixer.in_proj.kernel[...]
    states = nnx.jit(lambda m, t: m.layer_states(t))(child, t)
    np.testing.assert_array_equal(states[1], states[2])  # layer 1 is the identity
    nnx.update(child.layers[0], jax.tree.map(jnp.zeros_like, nnx.state(child.layers[0], nnx.Param)))
    assert float(jnp.abs(model.layers[0].mixer.in_proj.kernel[...]).sum()) > 0
    # a mixer module is wrapped with the replaced layer's norm: swapping in the layer's own mixer is exact
    same = model.replace_layers({2: (LAYERS[2], model.layers[2].mixer)})
    np.testing.assert_array_equal(logits_of(same, t), logits_of(model, t))
    with pytest.raises(ValueError, match="built for MambaSpec"):
        model.replace_layers({2: (LAYERS[2], model.layers[0].mixer)})
    other_window = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=3)
    with pytest.raises(ValueError, match="built for AttentionSpec"):  # same shapes, different math
        model.replace_layers({2: (other_window, model.layers[2].mixer)})
    narrower = nj.HybridLM(CFG.replace_layers({1: MLPSpec(40, bias=True)}), rngs=nnx.Rngs(0)).layers[1]
    with pytest.raises(ValueError, match="does not have the parameters"):
        model.replace_layers({1: (MLPSpec(48, bias=True), narrower.mixer)})
    with pytest.raises(ValueError, match="out of range"):
        model.replace_layers({len(LAYERS): (NoOpSpec(), None)})
    with pytest.raises(AttributeError):
        model.cfg = CFG  # the config only changes through replace_layers


# ------------------------------------------------------------------------------------------ training
def _tc(tmp_path, name, **kw):
    return TrainConfig(**{**dict(data="text", seq_len=16, batch_size=2, steps=4, warmup_steps=1, save_every=2,
                                 eval_every=2, eval_batches=1, log_every=1, sample_tokens=0,
                                 out_dir=str(tmp_path / name)), **kw})


def test_trains_checkpoints_and_resumes_bit_for_bit(model, tmp_path):
    """Two runs, not three: the resumed run continues a copy of the straight run from its step-2
    checkpoint (every run compiles its own steps, the bulk of the time). How a run gets interrupted
    does not depend on the layers; tests/train/test_trainer.py resumes after a SIGINT. Both start from
    the fixture's weights (copied; an eager init costs seconds per parameter shape)."""
    straight = loop.train(_tc(tmp_path, "straight"), initial_model=model, quiet=True)
    assert straight["step"] == 4 and np.isfinite(straight["final_eval"]["ce"])
    records = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    for r in trained:  # per-layer expert load of both MoE layers (8 and 4 experts), each a distribution
        assert len(r["moe_load/layers.3.mixer"]) == 8 and len(r["moe_load/layers.8.mixer"]) == 4
        assert abs(sum(r["moe_load/layers.8.mixer"]) - 1) < 1e-5
    assert ModelConfig.load(tmp_path / "straight" / "model_config.json") == CFG

    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    resumed = loop.train(_tc(tmp_path, "resumed", resume_step=2), initial_model=model, quiet=True)
    assert resumed["step"] == 4 and resumed["segments"][-1]["resumed_from"] == 2
    _, a, _ = loop.load_run(tmp_path / "straight")
    _, b, _ = loop.load_run(tmp_path / "resumed")
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.cfg == b.cfg == CFG


def test_a_distillation_loss_trains_a_pruned_child_towards_its_parent():
    """make_train_step with a loss_fn of our own: a child (one MoE layer pruned to 4 experts, one layer
    dropped, one linearised) learns the parent's next-token distribution from logits carried in the batch."""
    parent = scaled(nj.HybridLM(nj.presets.get("tiny-moe"), rngs=nnx.Rngs(2)))
    child = parent.replace_layers({1: (MoESpec(num_experts=4, top_k=1, intermediate_size=32), None),
                                   2: (NoOpSpec(), None), 3: (LinearSpec(), None)}, rngs=nnx.Rngs(3))
    tc = TrainConfig(seq_len=16, batch_size=2, steps=40, warmup_steps=0, lr=1e-2, moe_aux_loss_coef=0.0)
    configure_moe(child, collect_stats=True)
    graphdef, tx, state = loop.init_state(tc, child)
    t = tokens(length=16)
    batch = {"inputs": t, "teacher_logits": logits_of(parent, t)}

    def kd(model, batch):
        loss = losses.kd_kl(model(batch["inputs"]), batch["teacher_logits"])
        return loss, {"kd": loss}

    def kl_by_hand(state):  # the objective's value, recomputed with NumPy from the merged student's logits
        student = loop.merged(graphdef, state)
        configure_moe(student, collect_stats=False)
        s = np.asarray(logits_of(student, t), np.float64)
        p = np.asarray(jax.nn.softmax(batch["teacher_logits"]), np.float64)
        log_q = s - s.max(-1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
        return float(np.mean(np.sum(p * (np.log(p) - log_q), -1)))

    eval_step, train_step = make_eval_step(graphdef, tc, loss_fn=kd), make_train_step(graphdef, tx, tc, loss_fn=kd)
    before = eval_step(state, batch)
    assert abs(float(before["kd"]) - kl_by_hand(state)) < 1e-5 * kl_by_hand(state)
    assert float(before["loss"]) == float(before["kd"]) and "moe_load/layers.1.mixer" in before
    for _ in range(tc.steps):
        state, metrics = train_step(state, batch)
    assert float(metrics["loss"]) < 0.3 * float(before["kd"])
    assert abs(float(eval_step(state, batch)["kd"]) - kl_by_hand(state)) < 1e-4 * float(before["kd"])
