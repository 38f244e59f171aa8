"""Samples printed at the end of a run and by `nemojax generate`: a text continuation, or a synthetic
task's targets beside the model's predictions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemojax.nn.model import HybridLM
from nemojax.train import losses


def sample_text(model: HybridLM, ds, prompt: str, n_tokens: int, seed: int = 0, temperature: float = 0.8,
                top_k: int | None = 40, top_p: float | None = None, **options) -> str:
    """A sampled continuation of `prompt` (text datasets). `options`: `generate`'s draft, num_draft and
    kv_cache_dtype."""
    return continue_text(model, ds, prompt, n_tokens, seed, temperature, top_k, top_p, **options)[0]


def continue_text(model: HybridLM, ds, prompt: str, n_tokens: int, seed: int = 0, temperature: float = 0.8,
                  top_k: int | None = 40, top_p: float | None = None, **options) -> tuple[str, dict | None]:
    """(continuation, speculative decoding's stats or None without a draft): `sample_text` for callers
    that report the acceptance rate."""
    from nemojax.generate import generate

    if not prompt:
        raise ValueError("prompt must be non-empty")
    ids = ds.tokenizer.encode(prompt)[None].astype(np.int32)
    drafted = options.get("draft") is not None
    out = generate(model, ids, max_new_tokens=n_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, key=jax.random.key(seed), **options, **({"return_stats": True} if drafted else {}))
    out, stats = out if drafted else (out, None)
    return ds.tokenizer.decode(np.asarray(out[0, ids.shape[1]:])), stats


# compiled: run op by op, a small model's forward compiles each of its hundreds of operations
_predict = nnx.jit(lambda model, inputs: jnp.argmax(model(inputs), -1))


def sample_task(model: HybridLM, ds) -> str:
    """For synthetic tasks: the first held-out sequence's scored targets beside the model's predictions."""
    b = ds.batch(0, rows=[0])
    pred = np.asarray(_predict(model, jnp.asarray(b["inputs"])))[0]
    t = b["targets"][0]
    pos = np.nonzero(t != losses.IGNORE)[0]
    return (f"targets     {t[pos].tolist()}\npredictions {pred[pos].tolist()}\n"
            f"correct     {int(np.sum(pred[pos] == t[pos]))}/{len(pos)}")
