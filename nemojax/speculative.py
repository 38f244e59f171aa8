"""Speculative decoding with the model's own multi-token-prediction (MTP) layers as the drafter.

Each step feeds the last committed token and k drafted tokens through the main model in one cached
forward, keeps the longest prefix of drafts the main model agrees with plus the main model's own token
at the first disagreement, and drafts the next k tokens with the MTP layers. The whole loop is one
compiled `lax.while_loop` over fixed-shape buffers.

Drafting follows the training semantics of `HybridLM.mtp_logits`: virtual depth j (1..k) runs the
MTP module `model.mtp[min(j, mtp_depth) - 1]` (one module per depth while there are enough, then the
last one re-applied: Megatron's `mtp_use_repeated_layer`) on the pairs (embedding of token t, depth
j-1's hidden state at token t-1), depth 0 being the main model's final hidden state; at token t it
predicts token t+1. Every virtual depth has its own cache, holding its entries for the committed
tokens. Once a step has committed its tokens, depth j runs once over them followed by drafts 1..j-1,
and its output at the last of these is draft j; so with mtp_depth >= k the drafts are exactly the
argmax (greedy) of `model.mtp_logits` on the committed tokens followed by the drafts. The forward has a
static length whatever was accepted: all k + 1 verified tokens with the drafts written after the accepted
ones (the tokens past them are causally invisible to the outputs read). It also wrote entries past the
committed tokens, which attention masks (they lie past the committed position) and the next step
overwrites; a depth with a layer of another kind is run over the committed tokens alone a second time.

Rollback: attention caches are rolled back by position alone (slots past `pos` are masked and later
overwritten), but a Mamba layer's conv and SSM states have advanced past every token it read. On a
partial acceptance each such layer goes back to its cache from before verification and reads the
accepted tokens again: its inputs at those tokens were recorded in the verification forward (causal, so
they are what a forward over the accepted tokens alone would give it), so only those layers run again;
exact for every layer kind. The number of accepted tokens selects, through `lax.switch`, a branch whose
re-runs have static lengths. Only the re-run caches pass through the conditional: XLA copies the
conditional's outputs and the operands its branches update in place, so with every cache in it (the
attention K/V of the main model and of every depth) each step copied each cache one to three times.

Batches: the cache has one position for all rows, so a step keeps the smallest number of accepted
drafts over the rows, and every row emits its own token at that position (its accepted draft or its
correction). Exact: given the tokens before it, each accepted draft and each correction is distributed
as the target (the speculative sampling lemma), whatever the other rows did.

Sampling (temperature > 0): draft j is drawn from q_j, the MTP logits under the same temperature /
top-k / top-p as the target p; it is accepted with probability min(1, p(d) / q(d)), else the token
is drawn from max(0, p - q) normalised, and after k accepted drafts one more from p. The emitted
tokens are distributed as plain sampling's (Leviathan et al. 2023; Chen et al. 2023). Greedy keeps a
draft iff it is the main model's argmax, so its output is plain greedy decoding's (up to a near-tie
between two logits, which a k+1-token forward and a one-token forward may round differently).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.nn.attention import Attention
from nemojax.sampling import sample_logits, truncated_logits


def _accept(logits, drafts, q, key, temperature, top_k, top_p):
    """Verification of one step. logits [B, k+1, V] of the main model after the last committed token
    and each draft; drafts [B, k]; q [B, k, V] the draft distributions (None when greedy).
    Returns (accepted [B, k] bool, emitted [B, k+1]): emitted[:, i] is draft i where accepted, else the
    main model's token at i (the correction; at i = k, the token after k accepted drafts)."""
    if temperature == 0.0:
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return drafts == target[:, :-1], target
    k_u, k_r = jax.random.split(key)
    p = jax.nn.softmax(truncated_logits(logits, temperature, top_k, top_p), axis=-1)
    p_d = jnp.take_along_axis(p[:, :-1], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    accepted = jax.random.uniform(k_u, drafts.shape) * q_d < p_d  # u < p/q, q(d) > 0 as d was drawn from q
    residual = jnp.maximum(p - jnp.pad(q, ((0, 0), (0, 1), (0, 0))), 0.0)  # after k drafts: p itself
    # p == q leaves nothing, but then the draft is always accepted and the draw unused
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p)
    resampled = jax.random.categorical(k_r, jnp.log(residual), axis=-1).astype(jnp.int32)
    return accepted, jnp.where(jnp.pad(accepted, ((0, 0), (0, 1))), jnp.pad(drafts, ((0, 0), (0, 1))), resampled)


def _rolls_back_by_position(block, cache) -> bool:
    """Whether a cache written past the committed tokens needs no undoing: none (a mixer without state), or
    attention's K/V, whose slots past the committed position are masked and overwritten by the next forward."""
    return cache is None or isinstance(block.mixer, Attention)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "num_draft", "temperature", "top_k", "top_p",
                                   "kv_cache_dtype"))
def speculative_generate(graphdef, state, tokens, key, *, max_new_tokens, num_draft, temperature, top_k, top_p,
                         kv_cache_dtype=None):
    """tokens [B, L] with L >= num_draft - 1 -> (tokens [B, L + max_new_tokens + num_draft + 1] of which
    the first cache["pos"] + 1 are committed (at least L + max_new_tokens; the last step may commit more),
    accepted drafts per step [max_new_tokens] (entries past `steps` are 0), steps, the main model's cache
    and the MTP depths' caches). `kv_cache_dtype`: the main model's (`HybridLM.init_cache`); the MTP
    depths cache in the model's dtype."""
    sampling = (temperature, top_k, top_p)
    model = nnx.merge(graphdef, state)
    k = num_draft
    b, l = tokens.shape
    total = l + max_new_tokens
    max_len = total + k  # a verification near the end writes up to k positions past the last kept token
    depths = [model.mtp[min(j, len(model.mtp)) - 1] for j in range(1, k + 1)]
    ssm_dtype = jnp.dtype(model.cfg.ssm_cache_dtype)
    act_dtype = model.embeddings[...].dtype

    def stateful(blocks, caches):
        """Indices of the caches that do not roll back by position (Mamba)."""
        return tuple(i for i, (blk, c) in enumerate(zip(blocks, caches)) if not _rolls_back_by_position(blk, c))

    def forward_depths(mtp_caches, carries, committed, h, n, m, key, prompt=False):
        """Enter committed tokens n .. n+m-1 (the first m of `committed` [B, M]) into every depth's cache and
        draft the next k tokens; h [B, M, D]: the main model's hidden states at tokens n-1 .. n+M-2;
        carries[j-1]: depth j's hidden state at token n-1. Depth j runs once over `committed` with drafts
        1..j-1 written after its first m tokens (what lies past them is causally invisible to these, and
        its cache entries lie past the committed position), so every shape is static while m may be traced;
        its output at the last draft drafts token j. `prompt`: no depth has entries yet, every token of
        `committed` is committed (m = M), and depth j's first token is token j (n = 1: the first j - 1 tokens
        are skipped). Returns (caches after the forward, what each depth read [(x, below)], carries at token
        n+m-1, drafts [B, k], their distributions [B, k, V] or None); a depth whose cache does not roll back
        by position must be re-run over its first m inputs (`rerun`)."""
        keys = jax.random.split(key, k)
        below, new_caches, reads, new_carries, drafts, logits = h, [], [], [], [], []
        for j, depth in enumerate(depths, start=1):
            mine = committed[:, j - 1:] if prompt else committed
            mj, pos = (mine.shape[1], n - 1) if prompt else (m, n - j)
            tokens = jnp.pad(mine, ((0, 0), (0, j - 1)))
            if drafts:
                tokens = jax.lax.dynamic_update_slice_in_dim(tokens, jnp.stack(drafts, axis=1), mj, axis=1)
            x = model.embed(tokens)
            out, normed, cache = depth(x, below, mtp_caches[j - 1], pos)
            last = jax.lax.dynamic_index_in_dim(normed, mj + j - 2, axis=1, keepdims=False)
            logits.append(model.logits(last))
            drafts.append(sample_logits(logits[-1], keys[j - 1], *sampling))
            new_caches.append(cache)
            reads.append((x, below))
            new_carries.append(carries[j - 1] if prompt and mj == 0  # depth k at the prompt: a carry no depth reads
                               else jax.lax.dynamic_index_in_dim(out, mj - 1, axis=1, keepdims=False))
            below = out if prompt else jnp.concatenate([carries[j - 1][:, None], out], axis=1)
        q = None if temperature == 0.0 else jax.nn.softmax(
            truncated_logits(jnp.stack(logits, axis=1), temperature, top_k, top_p), axis=-1)
        return tuple(new_caches), reads, tuple(new_carries), jnp.stack(drafts, axis=1), q

    def rerun(old_caches, reads, n, m, prompt=False):
        """The caches of the depths that do not roll back by position, re-run from `old_caches` over their
        first m inputs (static m): {depth index: cache}."""
        out = {}
        for j, depth in enumerate(depths, start=1):
            if stateful(depth.blocks, old_caches[j - 1]):
                x, below = reads[j - 1]
                mj, pos = (x.shape[1] - (j - 1), n - 1) if prompt else (m, n - j)  # as in forward_depths
                out[j - 1] = depth(x[:, :mj], below[:, :mj], old_caches[j - 1], pos)[2]
        return out

    def with_reruns(caches, reruns):
        return tuple(reruns.get(i, c) for i, c in enumerate(caches))

    k_first, k_draft, key = jax.random.split(key, 3)
    cache = model.init_cache(b, max_len, kv_cache_dtype=kv_cache_dtype)
    h, cache = model.hidden_states(tokens, cache)
    first = sample_logits(model.logits(model.norm_f(h[:, -1])), k_first, *sampling)
    seq = jnp.concatenate([tokens, first[:, None]], axis=1)
    # Depth j enters tokens j .. L (positions 0 .. L-j; none when L = j - 1).
    mtp_caches = tuple(depth.init_cache(b, max_len, dtype=model.dtype, ssm_dtype=ssm_dtype) for depth in depths)
    carries = (jnp.zeros((b, h.shape[-1]), h.dtype),) * k
    new_caches, reads, carries, drafts, q = forward_depths(mtp_caches, carries, seq[:, 1:], h, 1, l, k_draft, prompt=True)
    mtp_caches = with_reruns(new_caches, rerun(mtp_caches, reads, 1, l, prompt=True))
    main_stateful = stateful(model.layers, cache["layers"])

    out = jnp.zeros((b, total + k + 1), jnp.int32).at[:, :l + 1].set(seq)
    log = jnp.zeros((max_new_tokens,), jnp.int32)

    def step(carry):
        out, n, cache, mtp_caches, carries, drafts, q, key, log, steps = carry
        key, k_verify, k_draft = jax.random.split(key, 3)
        inp = jnp.concatenate([jax.lax.dynamic_slice_in_dim(out, n - 1, 1, axis=1), drafts], axis=1)
        h, verified, inputs = model._run(inp, cache, collect=True)  # inputs[i]: what layer i read
        accepted, emitted = _accept(model.logits(model.norm_f(h)), drafts, q, k_verify, *sampling)
        a = jnp.min(jnp.sum(jnp.cumprod(accepted, axis=1), axis=1))
        out = jax.lax.dynamic_update_slice_in_dim(out, emitted, n, axis=1)
        new_caches, reads, carries, drafts, q = forward_depths(mtp_caches, carries, emitted, h, n, a + 1, k_draft)

        # Only what does not roll back by position goes through the switch (the number of accepted tokens
        # fixes the re-runs' static lengths): attention caches, the largest, stay out of the conditional,
        # whose outputs XLA copies.
        def keep(m):
            def branch():
                main = tuple(verified["layers"][i] if m == k + 1 else
                             model.layers[i](inputs[i][:, :m], cache["layers"][i], cache["pos"], act_dtype)[1]
                             for i in main_stateful)
                return main, rerun(mtp_caches, reads, n, m)
            return branch

        main, reruns = jax.lax.switch(a, [keep(m) for m in range(1, k + 2)])
        layers = dict(zip(main_stateful, main))
        cache = dict(verified, pos=cache["pos"] + a + 1,
                     layers=tuple(layers.get(i, c) for i, c in enumerate(verified["layers"])))
        return (out, n + a + 1, cache, with_reruns(new_caches, reruns), carries, drafts, q, key, log.at[steps].set(a),
                steps + 1)

    init = (out, jnp.int32(l + 1), cache, mtp_caches, carries, drafts, q, key, log, jnp.int32(0))
    out, _, cache, mtp_caches, *_, log, steps = jax.lax.while_loop(lambda c: c[1] < total, step, init)
    return out, log, steps, cache, mtp_caches
