"""Global knowledge distillation of an assembled child from its parent (Puzzle's GKD stage), on the
trainer of `nemojax.train`: the loss is sum over layers of the cosine distance between the child's and
the parent's residual streams (layers matched by position: a no-op layer is still a layer) plus
KL(parent || child) of the next-token distributions, optionally plus the LM loss.

The parent runs as a separate jitted forward on every batch (`teacher`), whose outputs ride in the
batch, so the train step does not hold the parent's weights as constants.
"""

from __future__ import annotations

import json
from functools import lru_cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.nn.ffn import inference_copy
from nemojax.nn.model import HybridLM
from nemojax.train import losses
from nemojax.train.config import TrainConfig
from nemojax.train.loop import load_run, train
from nemojax.train.step import cast_for_compute

DISTILL_CONFIG_NAME = "distill_config.json"


def gkd_loss(child_states, parent_states, child_logits, parent_logits, mask, *, lm: bool = False, targets=None):
    """(loss, terms): loss = sum_l mean(1 - cos(h_child_l, h_parent_l)) + mean KL(parent || child)
    [+ CE(child, targets) with `lm`], every mean over the positions where `mask` is 1.

    `*_states`: the residual stream after every layer (`model.layer_states(tokens)[1:]`), one [B, L, D]
    array per layer; `*_logits` [B, L, V]. Softmax, KL and cosine are computed in fp32.
    terms: {"cos": the summed cosine distance, "kl": the KL, and "ce" with `lm`}."""
    if len(child_states) != len(parent_states):
        raise ValueError(f"child_states has {len(child_states)} layers and parent_states {len(parent_states)}; "
                         "layers are matched by position, so a child keeps the parent's layer count")
    if lm and targets is None:
        raise ValueError("targets: required with lm=True (the LM loss needs them)")
    cos = sum(losses.cosine_distance(c, p, mask) for c, p in zip(child_states, parent_states))
    kl = losses.kd_kl(child_logits, parent_logits, mask)
    terms = {"cos": cos, "kl": kl}
    if lm:
        terms["ce"] = losses.cross_entropy(child_logits, targets)[0]
    return sum(terms.values()), terms


def gkd_loss_fn(model, batch, *, lm: bool = False):
    """The trainer's loss function (`train(loss_fn=...)`): `gkd_loss` of `model` against the teacher's
    outputs in `batch` (see `teacher`). Its metrics: the GKD total "gkd" and its terms "cos" and "kl",
    plus the held-out quantities every run reports, "ce" and "accuracy" (CE is in the loss only with `lm`)."""
    states = model.layer_states(batch["inputs"])[1:]
    logits = model.logits(model.norm_f(states[-1]))
    targets = batch["targets"]
    scored = targets != losses.IGNORE
    loss, terms = gkd_loss(states, batch["parent_states"], logits, batch["parent_logits"], scored, lm=lm,
                           targets=targets)
    ce, n_tokens = losses.cross_entropy(logits, targets)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) & scored)
    return loss, {"gkd": loss, "cos": terms["cos"], "kl": terms["kl"], "ce": ce,
                  "accuracy": correct / jnp.maximum(n_tokens, 1)}


def teacher(parent: HybridLM, compute_dtype: str = "float32"):
    """`batch_fn` for `train`: adds the parent's residual stream after every layer ("parent_states") and
    its logits ("parent_logits") to a batch, from one jitted forward whose weights are an argument (not
    constants of the compiled step). The parent computes in `compute_dtype`, as its student does."""
    graphdef, params, rest = nnx.split(inference_copy(parent), nnx.Param, ...)
    params = cast_for_compute(params, compute_dtype)
    forward = _teacher_forward(graphdef)

    def add_teacher(batch):
        states, logits = forward(params, rest, batch["inputs"])
        return {**batch, "parent_states": states, "parent_logits": logits}

    return add_teacher


@lru_cache(maxsize=8)
def _teacher_forward(graphdef):
    """One compiled forward per parent architecture, shared by the distillation runs of one process
    (children at several budgets, with and without the LM loss)."""

    @jax.jit
    def forward(params, rest, inputs):
        model = nnx.merge(graphdef, params, rest)
        states = model.layer_states(inputs)[1:]
        return states, model.logits(model.norm_f(states[-1]))

    return forward


def distill(parent, child: HybridLM, out_dir, *, steps: int, lr: float, lm: bool = False,
            train_config: TrainConfig | None = None, quiet: bool = False, **overrides) -> dict:
    """Distil `child` from `parent` into the run directory `out_dir`; returns the run's summary (also in
    out_dir/summary.json), with "kl_to_parent": the held-out KL(parent || child) before and after.

    `parent`: a run directory of `nemojax train` (its TrainConfig gives the data, sequence length,
    batch size and seed) or a HybridLM with `train_config` saying those. `overrides` are further
    TrainConfig fields (warmup_steps defaults to steps // 10). The child's starting weights are used
    only when out_dir holds no checkpoint; otherwise the run resumes (out_dir/distill_config.json
    records the parent and `lm`, which a resume may not change)."""
    if isinstance(parent, HybridLM):
        if train_config is None:
            raise ValueError("train_config: required when parent is a model (it names the data, seq_len, ...)")
        tc, source = train_config, None
    else:
        if train_config is not None:
            raise ValueError("train_config: give it only with a parent model; a parent run directory has its own")
        source = str(Path(parent).resolve())
        tc, parent, _ = load_run(parent)
    if parent.cfg.vocab_size != child.cfg.vocab_size or len(parent.layers) != len(child.layers):
        raise ValueError(f"child: needs the parent's vocabulary ({parent.cfg.vocab_size}) and layer count "
                         f"({len(parent.layers)}); got {child.cfg.vocab_size} and {len(child.layers)}")
    out = Path(out_dir)
    settings = {"parent": source, "lm": lm}
    saved = out / DISTILL_CONFIG_NAME
    if saved.exists() and json.loads(saved.read_text()) != settings:
        raise ValueError(f"cannot resume {out}: it distils with {json.loads(saved.read_text())}, not {settings}; "
                         "use another out_dir")
    tc = tc.replace(**{"resume": True, "resume_step": None, "allow_changes": False, "warmup_steps": None,
                       **overrides, "out_dir": str(out), "steps": steps, "lr": lr})
    summary = train(tc, quiet=quiet, initial_model=child, loss_fn=partial(gkd_loss_fn, lm=lm),
                    batch_fn=teacher(parent, tc.compute_dtype))
    saved.write_text(json.dumps(settings, indent=2) + "\n")
    summary["kl_to_parent"] = {k: summary[f"{k}_eval"]["kl"] for k in ("initial", "final") if f"{k}_eval" in summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary
