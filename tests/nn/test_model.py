import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax as nj
from testutils import chi_square_pvalue, rel_err

TINY = ["tiny-hybrid", "tiny-moe", "tiny-latent-mtp"]


def scaled_model(name, seed=0):
    """A tiny model with weights scaled up so that every layer visibly changes the logits."""
    model = nj.HybridLM(nj.presets.get(name), rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    bumped = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2 else x for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, bumped))
    return model


def tokens_for(model, b=2, l=37, seed=3):
    return jax.random.randint(jax.random.key(seed), (b, l), 0, model.cfg.vocab_size, jnp.int32)


def test_cached_forward_and_decode_reproduce_full_forward():
    """On tiny-hybrid (Mamba, attention, MLP: every kind of cache). MoE layers keep no cache; the
    every-layer-differs model of test_heterogeneous.py runs the same check with MoE, latent-MoE, windowed
    attention and other layer kinds."""
    model = scaled_model("tiny-hybrid")
    tokens = tokens_for(model)  # 37 tokens: two full 16-token chunks and a partial one
    full = nnx.jit(lambda m, t: m(t))(model, tokens)  # jitted: op by op, every new length recompiles each op
    cached_forward = nnx.jit(lambda m, t, c: m.forward(t, c))
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    pieces = []
    # prefill, then a cached multi-token forward across the chunk boundary at 16 (same length: one compile)
    for start, stop in [(0, 14), (14, 28)]:
        logits, cache = cached_forward(model, tokens[:, start:stop], cache)
        pieces.append(logits)
    for t in range(28, 37):  # then token-by-token decode, across the boundary at 32
        logits, cache = cached_forward(model, tokens[:, t:t + 1], cache)
        pieces.append(logits)
    assert int(cache["pos"]) == 37
    assert rel_err(jnp.concatenate(pieces, axis=1), full) < 1e-5


def test_every_layer_matters():
    """Guards the parity tests against a layer that silently does nothing."""
    model = scaled_model("tiny-moe")
    tokens = tokens_for(model)
    base = model(tokens)
    for i in range(len(model.layers)):
        state = nnx.state(model.layers[i].mixer, nnx.Param)
        saved = jax.tree.map(lambda x: x, state)
        nnx.update(model.layers[i].mixer, jax.tree.map(jnp.zeros_like, state))
        assert rel_err(model(tokens), base) > 1e-3, f"layer {i} has no effect"
        nnx.update(model.layers[i].mixer, saved)


def rms_rel_err(a, b):
    """RMS of a - b over the RMS spread of b's logits around their per-position mean (a max-based error
    would be set by the few tokens whose bf16 router picks another expert)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean((b - b.mean(-1, keepdims=True)) ** 2)))


def mean_kl(logits_p, logits_q):
    """Mean over positions of KL(softmax p || softmax q), in float64."""
    lp = jax.nn.log_softmax(np.asarray(logits_p, np.float64), axis=-1)
    lq = jax.nn.log_softmax(np.asarray(logits_q, np.float64), axis=-1)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


@pytest.mark.parametrize("name", TINY)
def test_bf16_forward_tracks_fp32(name):
    """bf16 weights and activations keep the fp32 model's logits (relative error) and next-token
    distributions (KL); bounds that the same architecture with other weights, or a uniform output,
    fail by far."""
    m32 = scaled_model(name)
    m16 = nj.HybridLM(m32.cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(m16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(m32, nnx.Param)))
    tokens = tokens_for(m32)
    l32, l16 = m32(tokens), m16(tokens)
    assert l16.dtype == jnp.float32  # logits always come out in fp32
    unrelated, uniform = scaled_model(name, seed=1)(tokens), jnp.zeros_like(l32)
    # measured: bf16 0.012-0.087 and 5e-5-2.5e-3; another seed ~1.4 and ~0.65; uniform >= 1 and ~0.33
    assert rms_rel_err(l16, l32) < 0.2 < min(rms_rel_err(unrelated, l32), rms_rel_err(uniform, l32))
    assert mean_kl(l32, l16) < 1e-2 < min(mean_kl(l32, unrelated), mean_kl(l32, uniform))


def test_bf16_decode_at_batch_two_tracks_the_bf16_full_forward():
    """A bf16 decode step at batch > 1 compiles on the CPU (XLA's CPU dot had no bf16 x bf16 -> fp32
    for the cached attention's layout and raised UNIMPLEMENTED) and agrees with the full forward."""
    m32 = scaled_model("tiny-hybrid")
    m16 = nj.HybridLM(m32.cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(m16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(m32, nnx.Param)))
    tokens = tokens_for(m16, l=9)
    step = nnx.jit(lambda m, t, c: m.forward(t, c))
    logits, cache = step(m16, tokens[:, :8], m16.init_cache(2, 9))
    last, _ = step(m16, tokens[:, 8:], cache)
    full = nnx.jit(lambda m, t: m(t))(m16, tokens)
    assert mean_kl(full[:, 8], last[:, 0]) < 1e-3 < mean_kl(full[:, 8], full[:, 7])


def test_greedy_generate_equals_argmax_of_full_forward():
    model = scaled_model("tiny-moe")
    prompt = tokens_for(model, l=11)
    out = nj.generate(model, prompt, max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(out[:, :11], prompt)
    # oracle: one full causal forward, no cache; position t's argmax is what greedy decoding picks after t
    full = nnx.jit(lambda m, t: m(t))(model, out[:, :-1])
    np.testing.assert_array_equal(out[:, 11:], jnp.argmax(full[:, 10:], -1))


def test_sampling_draws_from_the_truncated_softmax():
    """The first sampled token of 4000 copies of one prompt against the distribution computed in
    float64 from the full forward's logits: softmax(logits / T) (a chi-square test that also rejects
    the wrong temperature), restricted to the top k or to the nucleus (never a token outside it), and
    greedy when the truncation leaves one token."""
    model = scaled_model("tiny-hybrid")
    prompt = tokens_for(model, b=1, l=9)
    greedy = nj.generate(model, prompt, max_new_tokens=5)
    key = jax.random.key(7)
    np.testing.assert_array_equal(nj.generate(model, prompt, 5, temperature=1.0, top_k=1, key=key), greedy)
    np.testing.assert_array_equal(nj.generate(model, prompt, 5, temperature=1.0, top_p=1e-6, key=key), greedy)

    logits = np.asarray(model(prompt)[0, -1], np.float64)

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    def draws(**kw):
        out = nj.generate(model, jnp.repeat(prompt, 4000, axis=0), 1, key=key, **kw)
        return np.bincount(np.asarray(out[:, -1]), minlength=logits.size)

    t = 2.0
    p = softmax(logits / t)
    counts = draws(temperature=t)
    assert chi_square_pvalue(counts, p) > 1e-3
    assert chi_square_pvalue(counts, softmax(logits)) < 1e-6  # T = 1: the test can tell

    top = np.argsort(-p)[:5]
    p_k = np.zeros_like(p)
    p_k[top] = p[top] / p[top].sum()
    counts = draws(temperature=t, top_k=5)
    assert set(np.nonzero(counts)[0]) == set(top)
    assert chi_square_pvalue(counts, p_k) > 1e-3

    order = np.argsort(-p)
    n_keep = int(np.sum(np.cumsum(p[order]) - p[order] < 0.5))  # smallest prefix reaching 0.5
    assert 1 < n_keep < logits.size // 2, n_keep  # half the mass in under half the tokens: truncation shows
    p_p = np.zeros_like(p)
    p_p[order[:n_keep]] = p[order[:n_keep]] / p[order[:n_keep]].sum()
    counts = draws(temperature=t, top_p=0.5)
    assert set(np.nonzero(counts)[0]) <= set(order[:n_keep])
    assert chi_square_pvalue(counts, p_p) > 1e-3


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    from nemojax.generate import sample_logits

    probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
    draws = jax.vmap(lambda k: sample_logits(jnp.log(probs), k, 1.0, top_p=0.75))(jax.random.split(jax.random.key(0), 2000))
    counts = np.bincount(np.asarray(draws).ravel(), minlength=4) / 2000
    # 0.5 < 0.75 <= 0.8: tokens 0 and 1 survive, renormalised to 0.625 / 0.375
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.04)


@pytest.mark.parametrize("bad,needle", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=1.0), "key"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_generate_rejects_bad_arguments(bad, needle):
    model = nj.HybridLM(nj.presets.get("tiny-hybrid"), rngs=nnx.Rngs(0))
    kw = dict(max_new_tokens=3) | bad
    with pytest.raises(ValueError, match=needle):
        nj.generate(model, jnp.zeros((1, 4), jnp.int32), **kw)


def test_mtp_depth_one_reads_hidden_state_and_next_token():
    model = scaled_model("tiny-latent-mtp")
    tokens = tokens_for(model, l=12)
    (mtp,) = model.mtp_logits(tokens)
    assert mtp.shape == (2, 12, model.cfg.vocab_size)
    # causality: depth-1 logits at t see tokens <= t+1 only
    t = 5
    changed = tokens.at[:, t + 2:].set((tokens[:, t + 2:] + 1) % model.cfg.vocab_size)
    np.testing.assert_allclose(model.mtp_logits(changed)[0][:, :t + 1], mtp[:, :t + 1], rtol=1e-6, atol=1e-6)
    # and it does depend on token t+1
    poked = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % model.cfg.vocab_size)
    assert rel_err(model.mtp_logits(poked)[0][:, t], mtp[:, t]) > 1e-3


def test_bad_tokens_are_rejected():
    model = nj.HybridLM(nj.presets.get("tiny-hybrid"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens must be an integer array"):
        model(jnp.zeros((4,), jnp.int32))


def test_kernels_switched_on_everywhere_match_the_xla_model():
    """configure_kernels routes every Mamba mixer, MLP / shared expert and routed-expert layer to its
    Pallas kernel (interpreted on the CPU): logits and parameter gradients equal the default model's."""
    model = nj.HybridLM(nj.presets.get("tiny-moe"), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)

    @nnx.jit  # eagerly, every op (each interpreted kernel too) is a compile of its own: ~3x slower
    def logits_and_grads(m):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        loss = lambda p: jnp.mean(jnp.sin(nnx.merge(graphdef, p, rest)(tokens)))  # noqa: E731
        return m(tokens), jax.grad(loss)(params)

    ref = logits_and_grads(model)
    nj.configure_kernels(model, ssd="pallas", ffn="pallas")
    nj.configure_kernels(model, moe="pallas")  # a setting not given stays as it is: the calls compose
    impls = {type(m).__name__: m.implementation for _, m in nnx.iter_modules(model) if hasattr(m, "implementation")}
    assert impls == {"Mamba2Mixer": "pallas", "MLP": "pallas", "MoE": "pallas", "Attention": None}
    out = logits_and_grads(model)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    with pytest.raises(ValueError, match="ssd must be None or one of"):
        nj.configure_kernels(model, ssd="triton")


def test_residual_in_fp32_keeps_the_stream_wide_and_the_mixers_in_the_model_dtype():
    cfg = nj.presets.get("tiny-hybrid")
    t = jax.random.randint(jax.random.key(4), (2, 24), 0, cfg.vocab_size)
    wide = cfg.replace(residual_in_fp32=True)
    ref = nj.HybridLM(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(nj.HybridLM(wide, rngs=nnx.Rngs(0))(t), ref(t))  # fp32: nothing changes
    models = {name: nj.HybridLM(c, rngs=nnx.Rngs(0), dtype=jnp.bfloat16) for name, c in (("wide", wide), ("narrow", cfg))}
    nnx.update(ref, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(models["narrow"])))  # same weights
    states = {name: m.layer_states(t) for name, m in models.items()}
    assert {s.dtype for s in states["wide"]} == {jnp.dtype(jnp.float32)}
    assert {s.dtype for s in states["narrow"]} == {jnp.dtype(jnp.bfloat16)}
    # mixer outputs added to a bf16 stream are rounded; the fp32 stream keeps them (ignoring the flag ties)
    exact = ref.layer_states(t)[-1]
    assert rel_err(states["wide"][-1], exact) < rel_err(states["narrow"][-1], exact)
    mtp = nj.HybridLM(nj.presets.get("tiny-latent-mtp").replace(residual_in_fp32=True), rngs=nnx.Rngs(0),
                      dtype=jnp.bfloat16)
    h = mtp.hidden_states(t)[0]
    assert h.dtype == jnp.float32 and mtp.mtp[0](mtp.embed(t), h)[0].dtype == jnp.float32  # MTP blocks too
