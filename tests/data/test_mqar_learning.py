"""MQAR is learnable: tiny HybridLMs trained on `data.make_dataset("mqar")` recall values on held-out
sequences far above both chance (1 / number of values) and the best recall-free guess (a uniform pick
among the sequence's own values, 1 / num_kv_pairs)."""

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemojax import HybridLM, data
from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, from_pattern

# A small vocabulary: each token's embedding is seen often, so the lookup forms in a few hundred steps.
TASK = dict(seq_len=24, num_kv_pairs=4, vocab_size=32)


def masked_ce(logits, targets):
    mask = targets != data.IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, targets, 0))
    return jnp.sum(ce * mask) / jnp.sum(mask)


def train_mqar(pattern: str, steps: int, seed: int = 0) -> float:
    """Held-out accuracy on the scored positions after `steps` of AdamW on MQAR batches of 64."""
    cfg = from_pattern(pattern, vocab_size=TASK["vocab_size"], hidden_size=64,
                       attention=AttentionSpec(num_heads=4, num_kv_heads=4, head_dim=16), mlp=MLPSpec(128),
                       mamba=MambaSpec(num_heads=4, head_dim=16, n_groups=1, state_size=16, chunk_size=32))
    model = HybridLM(cfg, rngs=nnx.Rngs(seed))
    sched = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, steps, 3e-4)
    opt = nnx.Optimizer(model, optax.adamw(sched, weight_decay=0.01), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, inputs, targets):
        loss, grads = nnx.value_and_grad(lambda m: masked_ce(m(inputs), targets))(model)
        opt.update(model, grads)
        return loss

    train = data.make_dataset("mqar", batch_size=64, seed=seed, **TASK)
    for s in range(steps):
        step(model, opt, **train.batch(s))
    held_out = data.make_dataset("mqar", batch_size=512, seed=seed + 1000, **TASK).batch(0)
    pred = np.asarray(nnx.jit(lambda m, x: m(x).argmax(-1))(model, held_out["inputs"]))
    scored = held_out["targets"] != data.IGNORE
    return float(np.mean(pred[scored] == held_out["targets"][scored]))


def test_hybrid_learns_mqar():
    # Mamba's short conv hands attention the previous token. Init seeds 0-5 reach 0.90-1.0 at 400 steps.
    assert train_mqar("M*", steps=400) > 0.7  # chance 1/16, recall-free best 1/4


def test_attention_only_learns_mqar():
    # NoPE attention must first derive the previous token from the causal mask alone: slower to form and
    # seed-dependent (init seeds 0-5 give 0.97, 0.97, 0.97, 0.96, 0.63, 0.97 at 1000 steps); seed 0
    # reaches 0.78 at 300 steps and 0.93 at 500.
    assert train_mqar("*-*-", steps=500) > 0.8
