"""The training loop: jit-compiled AdamW steps on a HybridLM with fp32 master weights, MoE load
balancing outside the optimizer, orbax checkpoints that resume bit for bit, JSONL metrics, a tqdm bar,
a loss plot, and a save on SIGINT/SIGTERM.

Exact resume: the whole state that the next step depends on is checkpointed (params, optimizer state
with its step count, router correction biases, RNG key), and the data are a pure function of
(seed, step), so the data position is the step itself.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from nemojax import config as cfg_mod
from nemojax.config import ModelConfig
from nemojax import data as data_mod
from nemojax.io.checkpoint import Checkpointer
from nemojax.nn.ffn import configure_moe, pop_moe_stats, update_router_biases
from nemojax.nn.model import HybridLM
from nemojax.train import losses
from nemojax.train.config import TrainConfig
from nemojax.train.metrics import MetricsLog, plot_metrics, read_metrics
from nemojax.train.optimizer import make_optimizer, path_names, schedule
from nemojax.train.sharding import (BATCH_AXES, MESH_AXES, batch_sharding, make_mesh, opt_state_specs, param_specs,
                                    to_shardings)

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


# ------------------------------------------------------------------------------------------- state
def make_dataset(tc: TrainConfig, split: str = "train"):
    opts = dict(tc.data_options)
    if tc.data_path is not None:
        opts["path"] = tc.data_path
    if split != "train":
        if tc.data in ("text", "file"):
            opts["split"] = split
        else:  # synthetic tasks: held-out instances come from another seed
            return data_mod.make_dataset(tc.data, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                         seed=tc.seed + 1_000_003, **opts)
    return data_mod.make_dataset(tc.data, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed, **opts)


def build_model(tc: TrainConfig, vocab_size: int, model_config: ModelConfig | None = None, mesh=None) -> HybridLM:
    """The preset's model (or `model_config`'s, which overrides the preset), set up for training; on a
    `mesh` with an "expert" axis > 1 its MoE layers run expert-parallel (all-to-all dispatch)."""
    cfg = model_config or cfg_mod.get(tc.preset)
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"model {cfg.name or tc.preset!r} has vocab_size {cfg.vocab_size} < the dataset's "
                         f"{vocab_size}; pick a model with a larger vocabulary or a dataset with a smaller one")
    model = HybridLM(cfg, rngs=nnx.Rngs(tc.seed))
    expert_parallel = mesh is not None and mesh.shape["expert"] > 1
    configure_moe(model, implementation=tc.moe_implementation, capacity_factor=tc.capacity_factor,
                  collect_stats=True, expert_mesh=mesh if expert_parallel else None)
    return model


def init_state(tc: TrainConfig, model: HybridLM):
    """(graphdef, optimizer, state): the state is a plain dict PyTree that orbax saves whole."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tc)
    state = {"params": params, "rest": rest, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(tc.seed))}
    return graphdef, tx, state


def make_train_mesh(tc: TrainConfig):
    """The mesh of `tc.mesh` ("data=2,fsdp=2,expert=2"); all devices on "data" when unset and there are
    several; None on a single device (no sharding at all)."""
    if tc.mesh is None:
        return make_mesh() if jax.device_count() > 1 else None
    sizes = {}
    for item in tc.mesh.split(","):
        axis, _, n = item.partition("=")
        if axis.strip() not in MESH_AXES or not n.strip().lstrip("-").isdigit():
            raise ValueError(f"mesh: expected AXIS=SIZE items with AXIS in {MESH_AXES}; got {item!r}")
        sizes[axis.strip()] = int(n)
    mesh = make_mesh(**sizes)
    split = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if tc.batch_size % split:
        raise ValueError(f"batch_size {tc.batch_size} must be divisible by the {split} data-parallel devices of "
                         f"mesh {dict(mesh.shape)}")
    return mesh


def shard_train_state(state, tx, mesh):
    """Places the train state on `mesh` by the partition rules (optimizer moments follow their params)."""
    p_specs = param_specs(state["params"], mesh)
    specs = {"params": p_specs, "rest": param_specs(state["rest"], mesh),
             "opt_state": opt_state_specs(tx, state["opt_state"], p_specs), "step": P(), "rng": P()}
    return jax.device_put(state, to_shardings(specs, mesh))


def merged(graphdef, state) -> HybridLM:
    return nnx.merge(graphdef, state["params"], state["rest"])


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
        new = {"params": params, "rest": rest, "opt_state": opt_state, "step": state["step"] + 1,
               "rng": jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])}
        return new, metrics

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


# ------------------------------------------------------------------------------------------ sample
def sample_text(model: HybridLM, ds, prompt: str, n_tokens: int, seed: int = 0, temperature: float = 0.8,
                top_k: int | None = 40) -> str:
    """A sampled continuation of `prompt` (text datasets)."""
    from nemojax.generate import generate

    if not prompt:
        raise ValueError("prompt must be non-empty")
    ids = ds.tokenizer.encode(prompt)[None].astype(np.int32)
    out = generate(model, ids, max_new_tokens=n_tokens, temperature=temperature, top_k=top_k,
                   key=jax.random.key(seed))
    return ds.tokenizer.decode(np.asarray(out[0, ids.shape[1]:]))


def sample_task(model: HybridLM, ds) -> str:
    """For synthetic tasks: the first held-out sequence's scored targets beside the model's predictions."""
    b = ds.batch(0)
    pred = np.asarray(jnp.argmax(model(jnp.asarray(b["inputs"][:1])), -1))[0]
    t = b["targets"][0]
    pos = np.nonzero(t != losses.IGNORE)[0]
    return (f"targets     {t[pos].tolist()}\npredictions {pred[pos].tolist()}\n"
            f"correct     {int(np.sum(pred[pos] == t[pos]))}/{len(pos)}")


# -------------------------------------------------------------------------------------------- loop
@contextmanager
def _stop_requests():
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (save, then exit)."""
    flag = {"signal": None}

    def handler(signum, _frame):
        flag["signal"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def train(tc: TrainConfig, *, model_config: ModelConfig | None = None, quiet: bool = False) -> dict:
    """Train (or continue training) per `tc`; returns a summary dict (also written to summary.json).

    `model_config` replaces the preset (ablations with custom architectures); the run directory keeps
    it as model_config.json (HF format), so `load_run`, `nemojax eval` and `generate` rebuild it."""
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out)
    model_config = model_config or cfg_mod.get(tc.preset)
    if ckpt.latest_step() is not None:
        if not tc.resume:
            raise ValueError(f"out_dir {out} already holds checkpoints (latest step {ckpt.latest_step()}); "
                             "resume (--resume) or choose another --out-dir")
        saved = TrainConfig.load(out / "train_config.json")
        changed = [k for k in ("preset", "data", "data_path", "data_options", "seq_len", "batch_size", "seed")
                   if getattr(saved, k) != getattr(tc, k)]
        if json.loads((out / "model_config.json").read_text()) != json.loads(json.dumps(model_config.to_hf())):
            changed.append("model_config")
        if changed:
            raise ValueError(f"cannot resume {out}: {changed} differ from the saved run; use another --out-dir")
    tc.save(out / "train_config.json")
    (out / "model_config.json").write_text(json.dumps(model_config.to_hf(), indent=2) + "\n")

    ds, ds_eval = make_dataset(tc), make_dataset(tc, "validation")
    mesh = make_train_mesh(tc)
    model = build_model(tc, ds.vocab_size, model_config, mesh)
    graphdef, tx, state = init_state(tc, model)
    if mesh is None:
        grad_shardings, to_device = None, lambda b: jax.tree.map(jnp.asarray, b)
    else:
        state = shard_train_state(state, tx, mesh)
        grad_shardings = to_shardings(param_specs(state["params"], mesh), mesh)
        to_device = lambda b: jax.device_put(b, batch_sharding(mesh))  # noqa: E731
    train_step, eval_step = make_train_step(graphdef, tx, tc, grad_shardings), make_eval_step(graphdef, tc)
    summary = {}
    if ckpt.latest_step() is not None:
        state, record = ckpt.restore(state)
        summary = record.get("summary", {})
    else:
        summary["initial_eval"] = evaluate(eval_step, state, ds_eval, tc.eval_batches)
    start = int(state["step"])
    log = MetricsLog(out / "metrics.jsonl", start)
    if start == 0:
        log.write({"step": 0, "eval_loss": summary["initial_eval"]["ce"],
                   "eval_accuracy": summary["initial_eval"]["accuracy"]})
    tokens_per_step = tc.batch_size * tc.seq_len

    def save(step):
        ckpt.save(step, state, {"step": step, "data_position": step, "summary": summary})

    interrupted = None
    with _stop_requests() as stop, tqdm(total=tc.steps, initial=start, desc=f"train {tc.preset}",
                                        disable=quiet, unit="step") as bar:
        t0, t_last = time.perf_counter(), time.perf_counter()
        for step in range(start, tc.steps):
            state, metrics = train_step(state, to_device(ds.batch(step)))
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                record = {k: v for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                record.update(step=done, tokens_per_s=tokens_per_step * min(tc.log_every, done - start) / (now - t_last))
                t_last = now
                if done % tc.eval_every == 0 or done == tc.steps:
                    ev = evaluate(eval_step, state, ds_eval, tc.eval_batches)
                    record.update(eval_loss=ev["ce"], eval_accuracy=ev["accuracy"])
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if done % tc.save_every == 0 or done == tc.steps:
                save(done)
            if stop["signal"] is not None:
                interrupted = signal.Signals(stop["signal"]).name
                if done % tc.save_every and done != tc.steps:
                    save(done)
                break
        ckpt.wait()
        elapsed = time.perf_counter() - t0

    step = int(state["step"])
    summary.update(step=step, seconds_this_run=elapsed, interrupted=interrupted)
    if step == tc.steps and interrupted is None:
        summary["final_eval"] = evaluate(eval_step, state, ds_eval, tc.eval_batches)
        model = merged(graphdef, state)
        if ds.tokenizer is None:
            summary["sample"] = sample_task(model, ds_eval)
        elif tc.sample_tokens > 0:
            summary["sample"] = sample_text(model, ds, tc.sample_prompt, tc.sample_tokens, tc.seed)
    records = read_metrics(out / "metrics.jsonl")
    if records:
        plot_metrics(records, out / "loss.png", title=f"{tc.preset} on {tc.data}")
    ckpt.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def load_run(run_dir, step: int | None = None):
    """(TrainConfig, model with the checkpoint's weights, record) of a run directory written by `train`."""
    run_dir = Path(run_dir)
    if not (run_dir / "train_config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a nemojax run directory (no train_config.json)")
    tc = TrainConfig.load(run_dir / "train_config.json")
    mc = ModelConfig.from_hf(run_dir / "model_config.json")
    vocab = make_dataset(tc).vocab_size
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(tc, vocab, mc)), nnx.Param, ...)[0]
    like = jax.eval_shape(lambda: init_state(tc, build_model(tc, vocab, mc))[2])
    ckpt = Checkpointer(run_dir)
    state, record = ckpt.restore(like, step)
    ckpt.close()
    model = merged(graphdef, state)
    configure_moe(model, collect_stats=False)  # inference: dropless, no stats
    return tc, model, record

