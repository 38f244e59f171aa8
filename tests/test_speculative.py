"""MTP speculative decoding (`nj.generate(..., draft="mtp")`) against plain decoding, an uncached
re-implementation of the draft-and-verify loop, and the exact sampling distribution by enumeration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemojax as nj
from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, from_pattern
from nemojax.speculative import speculative_generate
from testutils import chi_square_pvalue, rel_err


def config(mtp_pattern="*-", mtp_depth=2, vocab_size=32):
    """Mamba, attention and MLP in the main model (so rollback meets every cache kind); chunk size 4 < k + 1
    for some k, so verification forwards cross SSD chunks."""
    return from_pattern("M*-", vocab_size=vocab_size, hidden_size=32,
                        mamba=MambaSpec(num_heads=2, head_dim=16, n_groups=1, state_size=8, chunk_size=4),
                        attention=AttentionSpec(num_heads=2, num_kv_heads=1, head_dim=16), mlp=MLPSpec(64),
                        mtp_pattern=mtp_pattern, mtp_depth=mtp_depth)


def drafting_model(cfg, mix, seed=0):
    """Unit-gain random weights, except that every projection writing into a residual stream is scaled by
    `mix`, and each MTP depth's input projection passes the token embedding through unchanged (and its
    hidden-state half is scaled by `mix`). At mix 0 the main model and every MTP depth compute the same
    bigram table lm_head(norm(embedding)), so every draft is right; as mix grows the layers move the main
    model's prediction away from the drafts'."""
    model = nj.HybridLM(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    d = cfg.hidden_size
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        shape = var.get_value().shape
        if path[0] == "embeddings":
            w = rng.standard_normal(shape)
        elif path[0] == "lm_head":
            w = 2.0 * rng.standard_normal(shape) / np.sqrt(d)
        elif path[-1] == "kernel":
            w = rng.standard_normal(shape) / np.sqrt(shape[0])
            if path[-2] in ("out_proj", "o_proj", "down_proj"):
                w *= mix
            if path[-2] == "eh_proj":  # [enorm(embedding), hnorm(h)] -> d
                w = np.concatenate([np.eye(d), mix * w[d:]])
        else:
            continue
        var.set_value(jnp.asarray(w, var.get_value().dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def draft_logits(model, tokens, k):
    """Uncached drafter: virtual depth j (1..k) runs MTP module min(j, mtp_depth) over the whole sequence
    exactly as `HybridLM.mtp_logits` runs depth j: at position s it embeds token s + j and reads depth
    j-1's hidden state at s, and predicts token s + j + 1."""
    h = model.hidden_states(tokens)[0]
    out = []
    for j in range(1, k + 1):
        depth = model.mtp[min(j, len(model.mtp)) - 1]
        h, normed = depth(model.embed(jnp.pad(tokens[:, j:], ((0, 0), (0, j)))), h)
        out.append(model.logits(normed))
    return out


K_MAX, BUFFER = 3, 32
main_logits = nnx.jit(lambda model, tokens: model(tokens))
drafter_logits = nnx.jit(lambda model, tokens: draft_logits(model, tokens, K_MAX))


def speculative_greedy_oracle(model, prompt, max_new_tokens, k):
    """Greedy draft-and-verify with full uncached forwards on a fixed [2, BUFFER] buffer (the model is
    causal, so what lies past a position never changes its logits; a single prompt is run twice):
    (tokens, drafts kept per step, the minimum over rows)."""
    b, l = prompt.shape
    total = l + max_new_tokens
    seq = np.zeros((2, BUFFER), np.int32)
    seq[:, :l] = prompt
    seq[:, l] = np.argmax(main_logits(model, jnp.asarray(seq))[:, l - 1], axis=-1)
    n, kept = l + 1, []
    while n < total:
        for j in range(k):  # draft j + 1 (token n + j): depth j + 1 at position n - 2
            seq[:, n + j] = np.argmax(drafter_logits(model, jnp.asarray(seq))[j][:, n - 2], axis=-1)
        target = np.argmax(main_logits(model, jnp.asarray(seq))[:, n - 1:n + k], axis=-1)
        agree = np.cumprod(seq[:, n:n + k] == target[:, :k], axis=1).sum(axis=1)
        a = int(agree.min())
        seq[:, n:n + a + 1] = target[:, :a + 1]
        n, kept = n + a + 1, kept + [a]
    return seq[:b, :total], kept


MODEL = drafting_model(config(), mix=0.25)
N_NEW, PROMPT_LEN = 14, 5  # one shape for every greedy call: the compiled loops are shared between tests


def test_the_oracle_drafter_is_mtp_logits_for_the_model_depths():
    tokens = jax.random.randint(jax.random.key(0), (2, BUFFER), 0, 32)
    ours, theirs = drafter_logits(MODEL, tokens), nnx.jit(lambda m, t: m.mtp_logits(t))(MODEL, tokens)
    assert rel_err(ours[:2], theirs) < 1e-6
    assert rel_err(ours[2], theirs[1]) > 1e-2  # depth 3 re-applies module 2 to depth 2's output


@pytest.mark.parametrize("k,batch,seed", [(1, 2, 0), (2, 1, 4), (3, 2, 4)])
def test_greedy_equals_plain_greedy_and_the_uncached_oracle(k, batch, seed):
    """k = 3 with mtp_depth 2 re-applies the last MTP module; batch 2 keeps the smaller acceptance."""
    prompts = jax.random.randint(jax.random.key(seed), (batch, PROMPT_LEN), 0, 32)
    out, stats = nj.generate(MODEL, prompts, N_NEW, draft="mtp", num_draft=k, return_stats=True)
    np.testing.assert_array_equal(out, nj.generate(MODEL, prompts, N_NEW))
    want_tokens, want_kept = speculative_greedy_oracle(MODEL, np.asarray(prompts), N_NEW, k)
    np.testing.assert_array_equal(out, want_tokens)
    assert stats["accepted_per_step"].tolist() == want_kept
    kept = stats["accepted_per_step"]
    assert 0 in kept and kept.max() >= 1, kept  # drafts rejected at the first position, and drafts kept
    assert stats["steps"] == len(kept) and stats["num_draft"] == k
    assert stats["acceptance_rate"] == pytest.approx(kept.sum() / (len(kept) * k))
    assert kept[:-1].sum() + len(kept) - 1 < N_NEW - 1 <= kept.sum() + len(kept)  # the loop stops in time


def test_an_mtp_depth_with_a_mamba_layer_is_rerun_over_the_committed_tokens():
    """A depth whose cache does not roll back by position (a Mamba layer's state has read the drafts) holds,
    after decoding, the state of an uncached run over the committed tokens alone; the output is plain greedy's."""
    model = drafting_model(config(mtp_pattern="M-"), mix=0.25)
    prompts = jax.random.randint(jax.random.key(4), (1, PROMPT_LEN), 0, 32)
    graphdef, state = nnx.split(model)
    out, kept, steps, cache, mtp_caches = speculative_generate(graphdef, state, prompts, jax.random.key(0),
                                                               max_new_tokens=N_NEW, num_draft=2, temperature=0.0,
                                                               top_k=None, top_p=None)
    kept = np.asarray(kept)[:int(steps)]
    assert 0 < np.sum(kept < 2) < len(kept)  # drafts rejected (depth 2 read a draft that was dropped), and kept
    n = int(cache["pos"]) + 1  # committed tokens
    np.testing.assert_array_equal(out[:, :n], nj.generate(model, prompts, n - PROMPT_LEN)[:, :n])

    @nnx.jit
    def uncached(model, tokens):  # depth j holds tokens j .. n-1, reading depth j-1 at tokens j-1 .. n-2
        h, states = model.hidden_states(tokens[:, :-1])[0], []
        for j, depth in enumerate(model.mtp, start=1):
            h, _, c = depth(model.embed(tokens[:, j:]), h[:, :n - j], depth.init_cache(1, n, dtype=jnp.float32,
                                                                                        ssm_dtype=jnp.float32), 0)
            states.append(c[0])  # the Mamba layer's conv and SSM states
        return states
    assert rel_err([c[0] for c in mtp_caches], uncached(model, out[:, :n])) < 1e-5


def test_a_prompt_shorter_than_the_drafts_is_first_extended_by_plain_decoding():
    prompts = jax.random.randint(jax.random.key(7), (1, 1), 0, 32)
    out, stats = nj.generate(MODEL, prompts, 9, draft="mtp", num_draft=3, return_stats=True)
    np.testing.assert_array_equal(out, nj.generate(MODEL, prompts, 9))
    assert np.sum(stats["accepted_per_step"] + 1) >= 7  # 9 = one plain token + one from the prefill + 7 verified


def test_caches_after_speculative_decoding_equal_a_plain_forward_over_the_tokens():
    k, b = 2, 1
    prompts = jax.random.randint(jax.random.key(4), (b, PROMPT_LEN), 0, 32)
    graphdef, state = nnx.split(MODEL)
    out, kept, steps, cache, _ = speculative_generate(graphdef, state, prompts, jax.random.key(0),
                                                      max_new_tokens=N_NEW, num_draft=k, temperature=0.0,
                                                      top_k=None, top_p=None)
    kept = np.asarray(kept)[:int(steps)]
    assert 0 < np.sum(kept < k) < len(kept)  # rollbacks happened, and full acceptances
    n = int(cache["pos"])  # the cache holds every committed token but the last
    assert n == PROMPT_LEN + np.sum(kept + 1)
    _, want = nnx.jit(lambda m, t: m.forward(t, m.init_cache(b, cache["layers"][1]["k"].shape[2])))(MODEL, out[:, :n])
    mamba, attn = cache["layers"][0], cache["layers"][1]
    assert rel_err(mamba, want["layers"][0]) < 1e-5
    assert rel_err([attn["k"][:, :, :n], attn["v"][:, :, :n]], [want["layers"][1][x][:, :, :n] for x in "kv"]) < 1e-5


def test_drafts_that_always_agree_are_all_accepted():
    model = drafting_model(config(), mix=0.0)
    prompts = jax.random.randint(jax.random.key(1), (2, PROMPT_LEN), 0, 32)
    for k in (1, 3):
        out, stats = nj.generate(model, prompts, N_NEW, draft="mtp", num_draft=k, return_stats=True)
        np.testing.assert_array_equal(out, nj.generate(model, prompts, N_NEW))
        assert stats["acceptance_rate"] == 1.0 and stats["steps"] == -(-(N_NEW - 1) // (k + 1))


def exact_probs(logits, temperature, top_k):
    """The target distribution written out in NumPy: softmax(logits / T) over the top_k largest."""
    z = np.asarray(logits, np.float64) / temperature
    kth = np.sort(z, axis=-1)[..., -top_k][..., None]
    p = np.where(z >= kth, np.exp(z - z.max(axis=-1, keepdims=True)), 0.0)
    return p / p.sum(axis=-1, keepdims=True)


main_and_draft_logits = nnx.jit(lambda m, t, k: (m(t), draft_logits(m, t, k)), static_argnums=2)


def exact_joint(model, prompt, temperature, top_k, k):
    """P(first three generated tokens) for the model (target) and for drafting them (token 1 from the main
    head, tokens 2 and 3 from MTP depths 1 and 2), by enumerating every continuation: [V, V, V] each."""
    v = model.cfg.vocab_size
    l = len(prompt)
    grid = np.stack(np.meshgrid(*[np.arange(v)] * 3, indexing="ij"), -1).reshape(-1, 3)
    seqs = jnp.asarray(np.concatenate([np.tile(prompt, (len(grid), 1)), grid], axis=1))
    main, drafts = main_and_draft_logits(model, seqs, k)
    p = exact_probs(main, temperature, top_k)
    q = [exact_probs(x, temperature, top_k) for x in drafts]
    y1, y2, y3 = grid.T
    rows = np.arange(len(grid))
    target = p[rows, l - 1, y1] * p[rows, l, y2] * p[rows, l + 1, y3]
    # token L + 1 is depth 1's prediction at position L - 1; token L + 2 is depth 2's at L - 1 too
    draft = p[rows, l - 1, y1] * q[0][rows, l - 1, y2] * q[1][rows, l - 1, y3]
    return target.reshape(v, v, v), draft.reshape(v, v, v)


def test_speculative_sampling_keeps_the_target_distribution():
    """Row 0 and row 1 of a two-prompt batch, 3 tokens with k = 2 drafts, over many keys: each row's empirical
    joint matches the exact target joint (Pearson, p > 1e-3 at a fixed seed) and not the drafter's. With drafts
    that always agree (p == q up to rounding) every draft is accepted."""
    cfg = config(vocab_size=8)
    model = drafting_model(cfg, mix=0.25, seed=1)
    temperature, top_k, k, n = 1.5, 4, 2, 20000
    prompts = jnp.asarray([[3, 1, 4, 1], [5, 2, 6, 5]], jnp.int32)
    graphdef, state = nnx.split(model)
    run = jax.jit(jax.vmap(lambda state, key: speculative_generate(
        graphdef, state, prompts, key, max_new_tokens=3, num_draft=k, temperature=temperature, top_k=top_k,
        top_p=None)[:3], in_axes=(None, 0)))
    keys = jax.random.split(jax.random.key(0), n)
    out, kept, _ = run(state, keys)
    first_kept = np.asarray(kept)[:, 0]
    assert 0.2 < np.mean(first_kept > 0) < 0.9 and np.mean(first_kept == 2) > 0.05  # drafts accepted and rejected
    for row in range(2):
        target, draft = exact_joint(model, np.asarray(prompts[row]), temperature, top_k, k)
        y = np.asarray(out)[:, row, 4:7]
        counts = np.bincount(np.ravel_multi_index(y.T, target.shape), minlength=target.size)
        assert chi_square_pvalue(counts, target.ravel()) > 1e-3
        tv_target, tv_draft = (0.5 * np.abs(counts / n - x.ravel()).sum() for x in (target, draft))
        assert tv_target < 0.04 and tv_draft > 0.15, (tv_target, tv_draft)
    _, kept, steps = run(nnx.state(drafting_model(cfg, mix=0.0, seed=1)), keys)  # all keys: no recompile
    assert np.all(np.asarray(kept)[:, 0] == k) and np.all(np.asarray(steps) == 1)


@pytest.mark.parametrize("kw,needle", [
    (dict(draft="eagle"), "draft must be None"),
    (dict(draft="mtp", num_draft=0), "num_draft must be an int >= 1"),
    (dict(num_draft=2), "num_draft=2 and return_stats=False are for speculative decoding"),
    (dict(return_stats=True), "return_stats=True are for speculative decoding"),
])
def test_bad_arguments_name_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle):
        nj.generate(MODEL, jnp.zeros((1, 3), jnp.int32), 4, **kw)


def test_a_model_without_mtp_layers_is_refused():
    model = nj.HybridLM(config(mtp_pattern="", mtp_depth=0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mtp_depth"):
        nj.generate(model, jnp.zeros((1, 3), jnp.int32), 4, draft="mtp")


def _cond_outputs(jaxpr):
    """Shapes of every `cond` output in a jaxpr and the jaxprs nested in it (while bodies, jit calls)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            yield from (v.aval.shape for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple) else (param,):
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    yield from _cond_outputs(getattr(sub, "jaxpr", sub))


def test_attention_caches_stay_out_of_the_rollback_conditional():
    """XLA copies a conditional's outputs every step: only the caches that cannot roll back by position
    (Mamba's) may pass through the switch on the number of accepted drafts, never an attention K/V."""
    k, b, n_new = 2, 1, 6
    prompts = jnp.zeros((b, PROMPT_LEN), jnp.int32)
    graphdef, state = nnx.split(MODEL)
    jaxpr = jax.make_jaxpr(lambda s, x: speculative_generate(graphdef, s, x, jax.random.key(0), max_new_tokens=n_new,
                                                             num_draft=k, temperature=0.0, top_k=None, top_p=None))
    shapes = list(_cond_outputs(jaxpr(state, prompts).jaxpr))
    mamba, attention = MODEL.cfg.layers[0], MODEL.cfg.layers[1]
    assert (b, attention.num_kv_heads, PROMPT_LEN + n_new + k, attention.head_dim) not in shapes
    assert (b, mamba.num_heads, mamba.head_dim, mamba.state_size) in shapes  # the Mamba SSM state does pass
