"""The training step: the objective (CE + MTP + MoE auxiliary terms) on a bf16 or fp32 compute copy of
fp32 master weights, the jitted AdamW step with aux-loss-free router balancing outside the optimizer,
and held-out evaluation."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemojax.nn.ffn import pop_moe_stats, update_correction_biases
from nemojax.nn.registry import rule_at
from nemojax.quant.training import rounding_key, set_rounding_keys
from nemojax.train import losses
from nemojax.train.config import TrainConfig
from nemojax.train.optimizer import schedule

def cast_for_compute(params, dtype):
    """The compute copy of fp32 master weights: floating params in `dtype`, except those whose layer kind
    keeps them in fp32 (norms, the router, the SSM's continuous-time parameters: the ops upcast these
    anyway, and rounding the weights first would still lose their precision)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, p: (p if rule_at(path).fp32 or not jnp.issubdtype(p.dtype, jnp.floating)
                         else p.astype(dtype)), params)


# ------------------------------------------------------------------------------------------ losses
def lm_loss(model, batch, *, mtp_lambda: float):
    """The language-modelling loss: next-token CE (+ the MTP loss, weighted by `mtp_lambda`).

    A loss function takes (model, batch) and returns (loss, metrics); `make_train_step` adds the MoE
    auxiliary terms. Distillation losses have the same shape, with the teacher's outputs (logits,
    layer states) carried in `batch` under keys of their own."""
    h, _ = model.hidden_states(batch["inputs"])
    logits = model.logits(model.norm_f(h))
    ce, n_tokens = losses.cross_entropy(logits, batch["targets"])
    scored = batch["targets"] != losses.IGNORE
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) & scored)
    metrics = {"ce": ce, "accuracy": correct / jnp.maximum(n_tokens, 1)}
    loss = ce
    if model.mtp:
        mtp = losses.mtp_loss(model.mtp_logits(batch["inputs"], h), batch["targets"], mtp_lambda)
        metrics["mtp_loss"] = mtp
        loss = loss + mtp
    return loss, metrics


def default_loss_fn(tc: TrainConfig):
    return partial(lm_loss, mtp_lambda=tc.mtp_lambda)


def _moe_metrics(stats) -> dict:
    """Totals over MoE layers (which may differ in expert count) and each layer's expert load."""
    if not stats:
        return {}
    out = {"moe_max_load": jnp.max(jnp.stack([jnp.max(s["load"]) * s["load"].shape[-1] for s in stats.values()])),
           "moe_dropped_fraction": jnp.mean(jnp.stack([s["dropped_fraction"] for s in stats.values()])),
           "moe_aux_loss": sum(s["aux_loss"] for s in stats.values()),
           "moe_z_loss": sum(s["z_loss"] for s in stats.values())}
    for layer, s in stats.items():  # load: fraction of the layer's routed assignments per expert
        out[f"moe_load/{layer}"] = s["load"]
        out[f"moe_dropped_fraction/{layer}"] = s["dropped_fraction"]
    return out


def objective(graphdef, tc: TrainConfig, loss_fn, params, rest, batch, key=None):
    """loss_fn's loss on the compute copy of `params`, plus the MoE auxiliary terms; `key`: the
    step's key of quantised training's randomness (`quant.training.rounding_key`), needed to differentiate
    a recipe with stochastic rounding or the Hadamard transform. Returns (loss, (metrics, moe stats))."""
    model = nnx.merge(graphdef, cast_for_compute(params, tc.compute_dtype), rest)
    if key is not None:
        set_rounding_keys(model, key)
    loss, metrics = loss_fn(model, batch)
    metrics = dict(metrics)
    stats = pop_moe_stats(model)
    metrics.update(_moe_metrics(stats))
    if stats:
        loss = loss + tc.moe_aux_loss_coef * metrics["moe_aux_loss"] + tc.router_z_loss_coef * metrics["moe_z_loss"]
    metrics["loss"] = loss
    return loss, (metrics, stats)


# ------------------------------------------------------------------------------------------- steps
def make_train_step(graphdef, tx, tc: TrainConfig, grad_shardings=None, loss_fn=None):
    """The jitted step. `loss_fn(model, batch) -> (loss, metrics)` (default: `lm_loss`); `grad_shardings`
    (the params' shardings on a mesh) pins the gradients to them, so FSDP-sharded weights get a
    reduce-scatter rather than a full all-reduce."""
    lr_at = schedule(tc)
    loss_fn = default_loss_fn(tc) if loss_fn is None else loss_fn
    precision = tc.precision_recipe()
    random_rounding = precision is not None and precision.needs_key

    @partial(jax.jit, donate_argnums=0)
    def train_step(state, batch):
        key = rounding_key(tc.seed, state["step"]) if random_rounding else None
        grad_fn = jax.value_and_grad(partial(objective, graphdef, tc, loss_fn), has_aux=True)
        (_, (metrics, stats)), grads = grad_fn(state["params"], state["rest"], batch, key)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Aux-loss-free balancing: the correction biases move by sign(mean load - load), outside the optimizer.
        model = nnx.merge(graphdef, params, state["rest"])
        update_correction_biases(model, stats, tc.correction_bias_rate)
        rest = nnx.split(model, nnx.Param, ...)[2]
        metrics.update(grad_norm=optax.tree.norm(grads), lr=lr_at(state["step"]))
        return {"params": params, "rest": rest, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


def make_eval_step(graphdef, tc: TrainConfig, loss_fn=None):
    loss_fn = default_loss_fn(tc) if loss_fn is None else loss_fn

    @jax.jit
    def eval_step(state, batch):
        return objective(graphdef, tc, loss_fn, state["params"], state["rest"], batch)[1][0]

    return eval_step


def evaluate(eval_step, state, ds, n_batches: int, load=None) -> dict:
    """Mean of every total the eval step reports (CE, accuracy, the loss and its terms; not the per-layer
    entries, whose names hold a "/") over the first `n_batches` batches of `ds` (the same batches every
    time), batch i read by `load(ds, i)` (default: `ds.batch(i)`)."""
    load = (lambda d, i: d.batch(i)) if load is None else load
    out = [eval_step(state, load(ds, i)) for i in range(n_batches)]
    return {k: float(np.mean([float(o[k]) for o in out])) for k in out[0] if "/" not in k}
