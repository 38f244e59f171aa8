"""The training loop: jit-compiled AdamW steps on a HybridLM with fp32 master weights, orbax checkpoints
that resume bit for bit, JSONL metrics, a tqdm bar, a loss plot, and a save on SIGINT/SIGTERM.

Exact resume: the whole state that the next step depends on is checkpointed (params, optimizer state
with its step count, router correction biases, RNG key), and the data are a pure function of
(seed, step), so the data position is the step itself.
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from nemojax import presets
from nemojax.config import ModelConfig
from nemojax import data as data_mod
from nemojax.io.checkpoint import Checkpointer
from nemojax.nn.ffn import configure_moe
from nemojax.nn.model import HybridLM
from nemojax.train.config import TrainConfig
from nemojax.train.metrics import MetricsLog, plot_metrics, read_metrics
from nemojax.train.optimizer import make_optimizer
from nemojax.train.sample import sample_task, sample_text
from nemojax.train.sharding import batch_sharding, make_train_mesh, param_specs, shard_train_state, to_shardings
from nemojax.train.step import evaluate, make_eval_step, make_train_step


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
    cfg = model_config or presets.get(tc.preset)
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


def merged(graphdef, state) -> HybridLM:
    return nnx.merge(graphdef, state["params"], state["rest"])



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
    model_config = model_config or presets.get(tc.preset)
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

