"""Replace-one-layer scores against NumPy formulas on the two models' own logits and hidden states; costs
against the actual caches and parameters of built blocks and against hand-written FLOP formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testutils import closed_form_counts

import nemojax as nj
from nemojax.config import (AttentionSpec, LinearSpec, MambaSpec, MLPSpec, ModelConfig, MoESpec, NoOpSpec,
                            from_pattern)
from nemojax.compress.puzzle import library, score
from nemojax.data.base import IGNORE
from nemojax.nn.model import Block


def scaled(model, seed=1):
    """Random weights large enough that replacing a layer moves the logits visibly."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
                                                   for x, k in zip(leaves, keys)]))
    return model


def batches_of(vocab, n=2, shape=(2, 12), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        targets = rng.integers(0, vocab, shape)
        targets[rng.random(shape) < 0.3] = IGNORE
        out.append({"inputs": rng.integers(0, vocab, shape), "targets": targets})
    return out


@pytest.fixture(scope="module")
def parent():
    return scaled(nj.HybridLM(nj.presets.get("tiny-hybrid"), rngs=nnx.Rngs(0)))  # M-M*-


forward = nnx.jit(lambda m, t: (m(t), m.norm_f(m.hidden_states(t)[0])))


def numpy_scores(child, parent, batches):
    """The four scores from the full forward passes of both models, in float64 NumPy."""
    kl, ce, correct, cos, n = [], [], [], [], 0
    for b in batches:
        (lc, hc), (lp, hp) = (jax.tree.map(lambda a: np.asarray(a, np.float64), forward(m, jnp.asarray(b["inputs"])))
                              for m in (child, parent))
        t = np.asarray(b["targets"])
        mask = t != IGNORE
        logq = lc - lc.max(-1, keepdims=True)
        logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
        logp = lp - lp.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        kl.append((np.exp(logp) * (logp - logq)).sum(-1)[mask])
        ce.append(-np.take_along_axis(logq, np.where(mask, t, 0)[..., None], -1)[..., 0][mask])
        correct.append((lc.argmax(-1) == t)[mask])
        cos.append(1 - (hc * hp).sum(-1)[mask] / (np.linalg.norm(hc, axis=-1) * np.linalg.norm(hp, axis=-1))[mask])
        n += mask.sum()
    return {name: np.concatenate(v).sum() / n for name, v in
            (("kl", kl), ("lm_loss", ce), ("accuracy", correct), ("cosine", cos))}, n


def test_scores_equal_numpy_formulas_on_the_full_models(parent):
    cfg = parent.cfg
    batches = batches_of(cfg.vocab_size)
    candidates = {"1:mlp_w50": (1, *library.prune_mlp(parent.layers[1].mixer, np.arange(0, 128, 2))),
                  "3:linear": (3, LinearSpec(), None),
                  "2:noop": (2, NoOpSpec(), None)}
    scores = score.replace_one_scores(parent, candidates, batches, progress=False)
    assert set(scores) == {"parent", *candidates}
    for key, (layer, spec, module) in candidates.items():
        ref, n = numpy_scores(parent.replace_layers({layer: (spec, module)}), parent, batches)
        assert scores[key]["tokens"] == n
        assert scores[key]["kl"] > 1e-4 and scores[key]["cosine"] > 1e-4  # the replacement mattered
        for name in ("kl", "lm_loss", "cosine"):
            np.testing.assert_allclose(scores[key][name], ref[name], rtol=2e-4, atol=1e-7, err_msg=f"{key} {name}")
        # an argmax may flip between two compilations at a near-tie: at most one position of n
        assert abs(scores[key]["accuracy"] - ref["accuracy"]) <= 1 / n
    ref, _ = numpy_scores(parent, parent, batches)
    np.testing.assert_allclose(scores["parent"]["lm_loss"], ref["lm_loss"], rtol=1e-5)
    assert abs(scores["parent"]["accuracy"] - ref["accuracy"]) <= 1 / n


def test_the_parent_and_copies_of_its_layers_score_zero_kl_exactly(parent):
    candidates = {f"{i}:parent": (i, spec, parent.layers[i].mixer) for i, spec in enumerate(parent.cfg.layers)}
    scores = score.replace_one_scores(parent, candidates, batches_of(parent.cfg.vocab_size), progress=False)
    for key in ("parent", *candidates):
        assert scores[key]["kl"] == 0.0, key
        assert scores[key]["cosine"] < 1e-6, key
        assert scores[key]["lm_loss"] == scores["parent"]["lm_loss"], key


def test_candidates_of_one_structure_compile_once():
    cfg = from_pattern("-*-", vocab_size=32, hidden_size=64, mlp=MLPSpec(128),  # 2 block structures
                       attention=AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16))
    parent = nj.HybridLM(cfg, rngs=nnx.Rngs(0))
    mlp = parent.layers[0].mixer
    candidates = {"0:mlp_a": (0, *library.prune_mlp(mlp, np.arange(64))),
                  "0:mlp_b": (0, *library.prune_mlp(mlp, np.arange(64, 128))),
                  "2:mlp": (2, *library.prune_mlp(parent.layers[2].mixer, np.arange(0, 128, 2))),
                  "0:linear": (0, LinearSpec(), None), "1:linear": (1, LinearSpec(), None)}
    score._apply_block.clear_cache()
    score.replace_one_scores(parent, candidates, batches_of(cfg.vocab_size, n=3), progress=False)
    assert score._apply_block._cache_size() == 2 + 2  # the parent's kinds, MLP(64), linear


def test_bad_candidates_and_batches_are_named(parent):
    b = batches_of(parent.cfg.vocab_size, n=1)
    with pytest.raises(ValueError, match=r"candidate '2:linear': its key must be '3:<name>'"):
        score.replace_one_scores(parent, {"2:linear": (3, LinearSpec(), None)}, b)
    with pytest.raises(ValueError, match=r"candidate '9:noop': layer must be an int in \[0, 5\)"):
        score.replace_one_scores(parent, {"9:noop": (9, NoOpSpec(), None)}, b)
    with pytest.raises(ValueError, match=r"batches\[0\]\['targets'\] must be an int array"):
        score.replace_one_scores(parent, {}, [{"inputs": b[0]["inputs"], "targets": b[0]["targets"] * 1.0}])
    with pytest.raises(ValueError, match="no scored position"):
        score.replace_one_scores(parent, {}, [{"inputs": b[0]["inputs"], "targets": np.full((2, 12), IGNORE)}])


def test_scores_round_trip_through_json(tmp_path):
    scores = {"parent": {"kl": 0.0, "lm_loss": 5.5, "accuracy": 0.25, "cosine": 0.0, "tokens": 10},
              "1:noop": {"kl": float("nan"), "lm_loss": float("inf"), "accuracy": 0.0, "cosine": 0.5, "tokens": 10}}
    costs = {"1:noop": {"params": 0, "memory": 0, "decode_latency": 1.5e-6}}
    path = tmp_path / "scores" / "scores.json"
    score.save_scores(path, scores, costs, {"batches": 2})
    got_scores, got_costs, meta = score.load_scores(path)
    assert math.isnan(got_scores["1:noop"].pop("kl")) and scores["1:noop"].pop("kl") != 0
    assert (got_scores, got_costs, meta) == (scores, costs, {"batches": 2})
    path.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a Puzzle scores file"):
        score.load_scores(path)


# ------------------------------------------------------------------------------------------ costs
D = 64
SPECS = [MambaSpec(num_heads=4, head_dim=16, n_groups=2, state_size=16, chunk_size=16),
         AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16),
         AttentionSpec(num_heads=4, num_kv_heads=1, head_dim=16, sliding_window=8),
         MLPSpec(96, bias=True), LinearSpec(bias=True), NoOpSpec(),
         MoESpec(num_experts=8, top_k=2, intermediate_size=32, shared_intermediate_size=48, latent_size=32)]


def built(spec, dtype):
    """The block's shapes and dtypes (nothing initialised)."""
    cfg = ModelConfig(vocab_size=8, hidden_size=D, layers=(spec,))
    return nnx.eval_shape(lambda: Block(spec, cfg, out_std=0.02, dtype=dtype, rngs=nnx.Rngs(0)))


def nbytes(tree) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_memory_is_the_weights_and_the_caches_that_init_cache_allocates(spec):
    batch, seq_len, dtype = 3, 20, jnp.bfloat16
    block = built(spec, dtype)
    # a sliding window needs only its last `window` tokens (a ring buffer); init_cache allocates seq_len
    slots = seq_len if getattr(spec, "sliding_window", None) is None else spec.sliding_window
    cache = jax.eval_shape(lambda: block.init_cache(batch, slots, dtype=dtype, ssm_dtype=jnp.float32))
    got = score.cache_bytes(spec, D, batch=batch, seq_len=seq_len, dtype=dtype, ssm_dtype=jnp.float32)
    assert got == nbytes(cache)
    assert (got > 0) == isinstance(spec, (MambaSpec, AttentionSpec))
    weights = nbytes(nnx.state(block, nnx.Variable))
    assert score.memory(spec, D, batch=batch, seq_len=seq_len, dtype=dtype, ssm_dtype=jnp.float32) == weights + got


def test_param_counts_equal_the_built_blocks_and_the_closed_forms(parent):
    mixers = parent.layers
    candidates = [(0, *library.prune_mamba_heads(mixers[0].mixer, np.array([0, 2]))),
                  (1, *library.prune_mlp(mixers[1].mixer, np.arange(40))),
                  (3, *library.pool_kv_heads(mixers[3].mixer, 1)),
                  (3, *library.sliding_window(mixers[3].mixer, 4)),
                  (4, LinearSpec(), None), (4, NoOpSpec(), None)]
    candidates += [(i, s, mixers[i].mixer) for i, s in enumerate(parent.cfg.layers)]
    for layer, spec, module in candidates:
        block = score.candidate_block(parent, layer, spec, module)
        n = sum(a.size for a in jax.tree.leaves(nnx.state(block, nnx.Param)))
        assert score.params(spec, D) == n, spec
        one_layer = closed_form_counts(ModelConfig(vocab_size=8, hidden_size=D, layers=(spec,)))[0]
        assert score.params(spec, D) == one_layer - (2 * 8 * D + D), spec  # less embeddings, head, final norm


def test_roofline_counts_equal_hand_formulas():
    batch, seq_len, item = 3, 20, 2
    kw = dict(batch=batch, seq_len=seq_len, dtype=jnp.bfloat16)
    mlp = MLPSpec(96)
    for phase, t in (("prefill", batch * seq_len), ("decode", batch)):
        flops, nb = score.flops_bytes(mlp, D, phase=phase, **kw)
        assert flops == 2 * 2 * t * D * 96
        assert nb == (2 * D * 96 + D) * item + 2 * t * D * item  # weights and pre-norm, input and output
        for gpu, (peak, bw) in {"H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}.items():
            assert score.roofline(mlp, D, phase=phase, gpu=gpu, **kw) == max(flops / peak, nb / bw)

    hq, hkv, dh, w = 4, 2, 16, 8
    for window in (None, w):
        attn = AttentionSpec(num_heads=hq, num_kv_heads=hkv, head_dim=dh, sliding_window=window)
        proj = lambda t: 2 * t * D * hq * dh * 2 + 2 * t * D * hkv * dh * 2  # noqa: E731  q, o; k, v
        keys = sum(min(i + 1, window or seq_len) for i in range(seq_len))  # per sequence, a loop
        flops, _ = score.flops_bytes(attn, D, phase="prefill", **kw)
        assert flops == proj(batch * seq_len) + batch * keys * hq * (2 * dh + 2 * dh)  # q.k and p.v
        flops, nb = score.flops_bytes(attn, D, phase="decode", **kw)
        seen = min(seq_len, window or seq_len)
        assert flops == proj(batch) + batch * seen * hq * 4 * dh
        weights = (2 * D * hq * dh + 2 * D * hkv * dh + D) * item
        assert nb == weights + 2 * batch * D * item + 2 * batch * hkv * dh * (seen + 1) * item

    moe = MoESpec(num_experts=8, top_k=2, intermediate_size=32, shared_intermediate_size=48)
    flops, nb = score.flops_bytes(moe, D, phase="decode", batch=3, seq_len=seq_len, dtype=jnp.bfloat16)
    assert flops == 2 * 3 * D * 8 + 3 * 2 * 4 * D * 32 + 4 * 3 * D * 48  # router, 2 experts a token, shared
    touched = min(8, 3 * 2)
    assert nb == (D * 8 + touched * 2 * D * 32 + 2 * D * 48 + D) * item + 8 * 4 + 2 * 3 * D * item
    with pytest.raises(ValueError, match="gpu must be one of"):
        score.roofline(mlp, D, gpu="B300", **kw)
    with pytest.raises(ValueError, match="phase must be one of"):
        score.roofline(mlp, D, phase="train", **kw)


def test_candidate_costs_cover_the_parent_layers_and_measure_latency():
    cfg = ModelConfig(vocab_size=16, hidden_size=D, layers=(SPECS[0], SPECS[1]))  # Mamba, attention
    parent = nj.HybridLM(cfg, rngs=nnx.Rngs(0))
    candidates = {"1:attn_kv1": (1, *library.pool_kv_heads(parent.layers[1].mixer, 1)), "0:noop": (0, NoOpSpec(), None)}
    costs = score.candidate_costs(parent, candidates, batch=2, seq_len=16, dtype=jnp.float32, repeats=1,
                                 progress=False)
    assert set(costs) == {"0:parent", "1:parent", *candidates}
    for key, row in costs.items():
        spec = {**{f"{i}:parent": s for i, s in enumerate(cfg.layers)}, **{k: v[1] for k, v in candidates.items()}}[key]
        assert row["params"] == score.params(spec, D)
        for phase in score.PHASES:
            assert row[f"{phase}_roofline"] == score.roofline(spec, D, batch=2, seq_len=16, dtype=jnp.float32,
                                                              phase=phase)
            value = row[f"{phase}_latency"]
            assert math.isfinite(value) and (value > 0) == (key != "0:noop"), (key, phase, value)
    assert costs["1:attn_kv1"]["memory"] < costs["1:parent"]["memory"]


def test_compare_equals_numpy_formulas_for_a_child_that_differs_in_every_layer(parent):
    batches = batches_of(parent.cfg.vocab_size, seed=3)
    child = parent.replace_layers({0: (NoOpSpec(), None), 1: library.prune_mlp(parent.layers[1].mixer, np.arange(64)),
                                   2: (NoOpSpec(), None), 3: library.sliding_window(parent.layers[3].mixer, 3),
                                   4: library.prune_mlp(parent.layers[4].mixer, np.arange(32, 96))})
    got = score.compare(parent, child, batches)
    ref, n = numpy_scores(child, parent, batches)
    assert got["tokens"] == n and got["kl"] > 1e-3
    for name in ("kl", "lm_loss", "cosine"):
        np.testing.assert_allclose(got[name], ref[name], rtol=2e-4, atol=1e-7, err_msg=name)
    assert abs(got["accuracy"] - ref["accuracy"]) <= 1 / n
    assert score.compare(parent, parent, batches)["kl"] == 0.0


def test_model_latency_times_every_model_in_every_round_and_names_bad_prompts(parent):
    with pytest.raises(ValueError, match="tokens: int \\[batch, prompt\\]"):
        score.model_latency({"parent": parent}, np.zeros(5, np.int32), new=2)
    with pytest.raises(ValueError, match="rounds"):
        score.model_latency({"parent": parent}, np.zeros((2, 4), np.int32), new=2, rounds=0)
    prompts = np.random.default_rng(0).integers(0, parent.cfg.vocab_size, (2, 4))
    lat = score.model_latency({"a": parent, "b": parent}, prompts, new=2, rounds=2)
    for t in lat.values():
        assert len(t["prefill_rounds"]) == len(t["decode_rounds"]) == 2
        assert t["prefill"] == np.median(t["prefill_rounds"]) > 0
