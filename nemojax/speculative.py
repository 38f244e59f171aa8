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
argmax (greedy) of `model.mtp_logits` on the committed tokens followed by the drafts. That forward also
wrote entries for the drafts, which attention masks (they lie past the committed position) and the next
step overwrites; a depth with a layer of another kind is run over the committed tokens alone a second time.

Rollback: attention caches are rolled back by position alone (slots past `pos` are masked and later
overwritten), but a Mamba layer's conv and SSM states have advanced past every token it read. On a
partial acceptance each such layer goes back to its cache from before verification and reads the
accepted tokens again: its inputs at those tokens were recorded in the verification forward (causal, so
they are what a forward over the accepted tokens alone would give it), so only those layers run again;
exact for every layer kind. The number of accepted tokens selects, through `lax.switch`, a branch whose
forwards have static lengths; the same branch enters the committed tokens into the MTP depths' caches
and drafts the next tokens.

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

    def rolled_back(cache, verified, inputs, m):
        """The main model's cache after the first m of the k + 1 verified tokens: `verified` (after all of
        them) where it rolls back by position, the other layers (Mamba) re-run on their m recorded inputs
        from `cache` (before verification)."""
        if m == k + 1:
            return verified
        pos = cache["pos"]
        layers = tuple(new if _rolls_back_by_position(block, old) else block(x[:, :m], old, pos, act_dtype)[1]
                       for block, old, new, x in zip(model.layers, cache["layers"], verified["layers"], inputs))
        return dict(verified, pos=pos + m, layers=layers)

    def enter_and_draft(mtp_caches, carries, committed, h, n, key, prompt=False):
        """Enter committed tokens n .. n+m-1 (`committed` [B, m]) into every depth's cache and draft the next
        k tokens; h [B, m, D]: the main model's hidden states at tokens n-1 .. n+m-2; carries[j-1]: depth
        j's hidden state at token n-1. Depth j runs once over its committed tokens followed by drafts
        1..j-1, and its last output drafts token j: a depth whose cache rolls back by position keeps the
        cache of that forward, another one is re-run over the committed tokens alone. `prompt`: no depth
        has entries yet, and depth j's first token is token j (n = 1: the first j - 1 tokens are skipped).
        Returns (caches, carries at token n+m-1, drafts [B, k], their distributions [B, k, V] or None)."""
        keys = jax.random.split(key, k)
        below, new_caches, new_carries, drafts, logits = h, [], [], [], []
        for j, depth in enumerate(depths, start=1):
            mine = committed[:, j - 1:] if prompt else committed
            m, pos = mine.shape[1], n - j + (j - 1 if prompt else 0)
            x = model.embed(jnp.concatenate([mine] + [d[:, None] for d in drafts], axis=1))
            out, normed, cache = depth(x, below, mtp_caches[j - 1], pos)
            if not all(_rolls_back_by_position(blk, c) for blk, c in zip(depth.blocks, mtp_caches[j - 1])):
                cache = depth(x[:, :m], below[:, :m], mtp_caches[j - 1], pos)[2]
            logits.append(model.logits(normed[:, -1]))
            drafts.append(sample_logits(logits[-1], keys[j - 1], *sampling))
            new_caches.append(cache)
            new_carries.append(out[:, m - 1] if m else carries[j - 1])  # m = 0: depth k, whose carry no depth reads
            below = out if prompt else jnp.concatenate([carries[j - 1][:, None], out], axis=1)
        q = None if temperature == 0.0 else jax.nn.softmax(
            truncated_logits(jnp.stack(logits, axis=1), temperature, top_k, top_p), axis=-1)
        return tuple(new_caches), tuple(new_carries), jnp.stack(drafts, axis=1), q

    k_first, k_draft, key = jax.random.split(key, 3)
    cache = model.init_cache(b, max_len, kv_cache_dtype=kv_cache_dtype)
    h, cache = model.hidden_states(tokens, cache)
    first = sample_logits(model.logits(model.norm_f(h[:, -1])), k_first, *sampling)
    seq = jnp.concatenate([tokens, first[:, None]], axis=1)
    # Depth j enters tokens j .. L (positions 0 .. L-j; none when L = j - 1).
    mtp_caches = tuple(depth.init_cache(b, max_len, dtype=model.dtype, ssm_dtype=ssm_dtype) for depth in depths)
    carries = (jnp.zeros((b, h.shape[-1]), h.dtype),) * k
    mtp_caches, carries, drafts, q = enter_and_draft(mtp_caches, carries, seq[:, 1:], h, 1, k_draft, prompt=True)

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

        def keep(a):
            def branch():
                main = rolled_back(cache, verified, inputs, a + 1)
                return (main,) + enter_and_draft(mtp_caches, carries, emitted[:, :a + 1], h[:, :a + 1], n, k_draft)
            return branch

        cache, mtp_caches, carries, drafts, q = jax.lax.switch(a, [keep(i) for i in range(k + 1)])
        return out, n + a + 1, cache, mtp_caches, carries, drafts, q, key, log.at[steps].set(a), steps + 1

    init = (out, jnp.int32(l + 1), cache, mtp_caches, carries, drafts, q, key, log, jnp.int32(0))
    out, _, cache, mtp_caches, *_, log, steps = jax.lax.while_loop(lambda c: c[1] < total, step, init)
    return out, log, steps, cache, mtp_caches
