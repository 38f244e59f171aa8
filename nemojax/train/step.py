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

from nemojax.nn.ffn import pop_moe_stats, update_router_biases
from nemojax.train import losses
from nemojax.train.config import TrainConfig
from nemojax.train.optimizer import path_names, schedule

# Kept in fp32 under bf16 compute: the SSM's continuous-time parameters, the router and the norms
# (the ops upcast these anyway; rounding the weights first would still lose their precision).
FP32_NAMES = ("A_log", "D", "dt_bias", "gate_weight")


def _keeps_fp32(path) -> bool:
    names = path_names(path)
    return names[-1] in FP32_NAMES or any("norm" in n for n in names[-2:])


def cast_for_compute(params, dtype):
    """The compute copy of fp32 master weights: floating params in `dtype`, except `FP32_NAMES` and norms."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p if _keeps_fp32(path) or not jnp.issubdtype(p.dtype, jnp.floating) else p.astype(dtype),
        params)



# ------------------------------------------------------------------------------------------- steps
def _moe_metrics(stats) -> dict:
    if not stats:
        return {}
    loads = jnp.stack([s["load"] for s in stats.values()])  # [layers, E] (layers of equal E only)
    return {"moe_max_load": jnp.max(jnp.max(loads, axis=-1) * loads.shape[-1]),
            "moe_dropped_fraction": jnp.mean(jnp.stack([s["dropped_fraction"] for s in stats.values()])),
            "moe_aux_loss": sum(s["aux_loss"] for s in stats.values()),
            "moe_z_loss": sum(s["z_loss"] for s in stats.values())}


def loss_and_metrics(graphdef, tc: TrainConfig, params, rest, batch):
    """Training objective: CE (+ MTP) + MoE auxiliary terms. Returns (loss, (metrics, moe stats))."""
    model = nnx.merge(graphdef, cast_for_compute(params, tc.compute_dtype), rest)
    h, _ = model.hidden_states(batch["inputs"])
    logits = model.logits(model.norm_f(h))
    ce, n_tokens = losses.cross_entropy(logits, batch["targets"])
    scored = batch["targets"] != losses.IGNORE
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) & scored)
    metrics = {"ce": ce, "accuracy": correct / jnp.maximum(n_tokens, 1)}
    loss = ce
    if model.mtp:
        mtp = losses.mtp_loss(model.mtp_logits(batch["inputs"], h), batch["targets"], tc.mtp_lambda)
        metrics["mtp_loss"] = mtp
        loss = loss + mtp
    stats = pop_moe_stats(model)
    metrics.update(_moe_metrics(stats))
    if stats:
        loss = loss + tc.moe_aux_loss_coef * metrics["moe_aux_loss"] + tc.router_z_loss_coef * metrics["moe_z_loss"]
    metrics["loss"] = loss
    return loss, (metrics, stats)


def make_train_step(graphdef, tx, tc: TrainConfig, grad_shardings=None):
    """The jitted step. `grad_shardings` (the params' shardings on a mesh) pins the gradients to them, so
    FSDP-sharded weights get a reduce-scatter rather than a full all-reduce."""
    lr_at = schedule(tc)

    @partial(jax.jit, donate_argnums=0)
    def train_step(state, batch):
        grad_fn = jax.value_and_grad(partial(loss_and_metrics, graphdef, tc), has_aux=True)
        (_, (metrics, stats)), grads = grad_fn(state["params"], state["rest"], batch)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Aux-loss-free balancing: the router biases move by sign(mean load - load), outside the optimizer.
        model = nnx.merge(graphdef, params, state["rest"])
        update_router_biases(model, stats, tc.router_bias_rate)
        rest = nnx.split(model, nnx.Param, ...)[2]
        metrics.update(grad_norm=optax.tree.norm(grads), lr=lr_at(state["step"]))
        return {"params": params, "rest": rest, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


def make_eval_step(graphdef, tc: TrainConfig):
    @jax.jit
    def eval_step(state, batch):
        return loss_and_metrics(graphdef, tc, state["params"], state["rest"], batch)[1][0]

    return eval_step


def evaluate(eval_step, state, ds, n_batches: int) -> dict:
    """Mean CE and accuracy over the first `n_batches` batches of `ds` (the same batches every time)."""
    out = [eval_step(state, ds.batch(i)) for i in range(n_batches)]
    return {k: float(np.mean([float(o[k]) for o in out])) for k in ("ce", "accuracy")}
