"""The training loop: jit-compiled AdamW steps on a HybridLM with fp32 master weights, orbax checkpoints
that resume bit for bit, JSONL metrics, a tqdm bar, a loss plot, and a save on SIGINT/SIGTERM.

Exact resume: the whole state that the next step depends on is checkpointed (params, optimizer state
with its step count, router correction biases), and the data are a pure function of (seed, step), so
the data position is the step itself (and so is the randomness of quantised training:
`quant.training.rounding_key`). Each checkpoint's arrays carry fingerprints; a damaged newest
checkpoint is set aside (moved, never deleted) and the run resumes from the newest intact one. A
checkpoint restores onto whatever mesh the resumed run has (orbax reshards it), so a run may continue
on another mesh shape, device count or number of processes.

Several processes (`nemojax.train.distributed`): every process runs this loop over the global mesh,
loads only its own rows of each batch, and stops after the same step on SIGINT/SIGTERM; process 0
alone writes metrics, plots, the summary and the configs, and draws the sample.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from nemojax import presets
from nemojax.config import ModelConfig
from nemojax import data as data_mod
from nemojax.io.checkpoint import Checkpointer, CheckpointMismatch, compile_fingerprints
from nemojax.nn.ffn import configure_moe, inference_copy
from nemojax.nn.model import HybridLM
from nemojax.quant.training import configure_precision
from nemojax.train import losses, memory
from nemojax.train.config import TrainConfig
from nemojax.train.distributed import is_main
from nemojax.train.metrics import MetricsLog, plot_metrics, read_metrics
from nemojax.train.optimizer import make_optimizer
from nemojax.train.sample import sample_task, sample_text
from nemojax.train.sharding import (batch_sharding, fsdp_replicated, load_batch, make_train_mesh, param_specs,
                                    shard_train_state, to_shardings)
from nemojax.train.step import evaluate, make_eval_step, make_train_step


# ------------------------------------------------------------------------------------------- state
def make_dataset(tc: TrainConfig, split: str = "train"):
    opts = dict(tc.data_options)
    if tc.data_path is not None:
        opts["path"] = tc.data_path
    if split != "train":
        if "split" in data_mod.options_of(tc.data):
            opts["split"] = split
        else:  # synthetic tasks: held-out instances come from another seed
            return data_mod.make_dataset(tc.data, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                         seed=tc.seed + 1_000_003, **opts)
    return data_mod.make_dataset(tc.data, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed, **opts)


def load_weights(model: HybridLM, source: HybridLM) -> None:
    """Set `model`'s weights (and router correction biases) to copies of `source`'s, cast to `model`'s
    dtypes: a bf16 source still trains with fp32 master weights, and the train step, which donates its
    state, never deletes the source's arrays. Both must be built from the same config."""
    if source.cfg != model.cfg:
        raise ValueError("initial_model: its config differs from the model being trained")
    keep = nnx.Not(nnx.Intermediate)  # sown MoE statistics are not weights
    nnx.update(model, jax.tree.map(lambda t, v: jnp.array(v, t.dtype, copy=True), nnx.state(model, keep),
                                   nnx.state(source, keep)))


def build_model(tc: TrainConfig, vocab_size: int, model_config: ModelConfig | None = None, mesh=None,
                weights: HybridLM | None = None) -> HybridLM:
    """The preset's model (or `model_config`'s, which overrides the preset), set up for training; on a
    `mesh` with an "expert" axis > 1 its MoE layers run expert-parallel (all-to-all dispatch); its linear
    layers run at `tc.precision`. Its weights are a fresh init, or copies of `weights`'s (a model of the
    same config; see `load_weights`)."""
    cfg = model_config or presets.get(tc.preset)
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"model {cfg.name or tc.preset!r} has vocab_size {cfg.vocab_size} < the dataset's "
                         f"{vocab_size}; pick a model with a larger vocabulary or a dataset with a smaller one")
    if weights is None:
        model = HybridLM(cfg, rngs=nnx.Rngs(tc.seed))
    else:  # shapes only, then filled: an init that is overwritten costs seconds per new shape on a CPU
        model = nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(tc.seed)))
        load_weights(model, weights)
    expert_parallel = mesh is not None and mesh.shape["expert"] > 1
    configure_moe(model, implementation=tc.moe_implementation, capacity_factor=tc.capacity_factor,
                  collect_stats=True, expert_mesh=mesh if expert_parallel else None)
    first, last = tc.high_precision_counts(len(cfg.layers))
    configure_precision(model, tc.precision_recipe(), first=first, last=last)
    return model


def init_state(tc: TrainConfig, model: HybridLM):
    """(graphdef, optimizer, state): the state is a plain dict PyTree that orbax saves whole."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tc)
    state = {"params": params, "rest": rest, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    return graphdef, tx, state


def merged(graphdef, state) -> HybridLM:
    return nnx.merge(graphdef, state["params"], state["rest"])


def local_copy(graphdef, state) -> HybridLM:
    """The model of a train state, whole on this process's default device and set up for inference
    (`inference_copy`); every process must call it, as it gathers the shards of the others."""
    params, rest = multihost_utils.process_allgather((state["params"], state["rest"]), tiled=True)
    return inference_copy(nnx.merge(graphdef, *jax.tree.map(jnp.asarray, (params, rest))))


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


_largest = jax.jit(jnp.max)


def _agreed_stop(flag: dict, mesh):
    """`poll() -> signal number or None`, called once per step: the signal of a `_stop_requests` flag
    that every process acts on at the same step. With several processes a signal may reach one of them
    only, or each at another step, so poll returns the largest signal any process had received at the
    previous poll: all stop after the same step, one step after the signal. That costs an all-reduce
    of one number per device per step, queued behind the step and read when the next step is queued,
    as the loss check is, so the host never waits for it."""
    if jax.process_count() == 1:
        return lambda: flag["signal"]
    sharding, n = batch_sharding(mesh), mesh.size  # one number per device: its process's flag
    queued = []

    def poll():
        local = jax.make_array_from_callback(
            (n,), sharding, lambda index: np.full(len(range(n)[index[0]]), flag["signal"] or 0, np.int32))
        queued.append(_largest(local))
        if len(queued) < 2:
            return None
        return int(queued.pop(0)) or None
    return poll


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite; nothing of the diverged steps was saved."""


def _check_finite(step: int, metrics, tc: TrainConfig, last_saved: int | None) -> None:
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    saved = (f"the newest checkpoint (step {last_saved}) is from before it" if last_saved is not None
             else "no checkpoint was written")
    raise TrainingDiverged(
        f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; {saved}. Try a lower --lr "
        f"(now {tc.lr}) or a longer --warmup-steps (now {tc.warmup_steps}), resuming with --allow-changes, or "
        f"--compute-dtype float32 (now {tc.compute_dtype}); if it diverges right after a resume, the checkpoint "
        f"may be damaged: --resume-step picks an older one")


def _say(msg: str) -> None:
    if is_main():
        tqdm.write(msg, file=sys.stderr)


def _differences(old, new, path: str) -> list[str]:
    """"path: old -> new" for each leaf where two JSON-like values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(old.keys() | new.keys(), key=str)
                for d in _differences(old.get(k), new.get(k), f"{path}.{k}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _resume_checks(tc: TrainConfig, out: Path, model_config: ModelConfig, latest: int) -> dict:
    """Refuses a resume that would change the run; returns the accepted setting changes."""
    if not tc.resume:
        raise ValueError(f"out_dir {out} already holds checkpoints (latest step {latest}); "
                         "resume (--resume) or choose another --out-dir")
    saved = TrainConfig.load(out / "train_config.json")
    fixed, changes = tc.changes_from(saved)
    saved_model = ModelConfig.load(out / "model_config.json")
    if saved_model != model_config:
        fixed += _differences(saved_model.to_dict(), model_config.to_dict(), "model_config")
    if fixed:
        raise ValueError(f"cannot resume {out}: {fixed} differ from the saved run; use another --out-dir")
    if changes and not tc.allow_changes:
        described = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
        raise ValueError(f"cannot resume {out} with changed settings ({described}): the run would continue on "
                         "another schedule; pass --allow-changes to do so (summary.json records the change), or "
                         "use another --out-dir")
    resume_at = latest if tc.resume_step is None else tc.resume_step
    if tc.steps < resume_at:
        raise ValueError(f"steps {tc.steps} is below the step to resume from in {out} ({resume_at})")
    return changes


def train(tc: TrainConfig, *, model_config: ModelConfig | None = None, quiet: bool = False,
          initial_model: HybridLM | None = None, loss_fn=None, batch_fn=None) -> dict:
    """Train (or continue training) per `tc`; returns a summary dict (also written to summary.json).

    `model_config` replaces the preset (ablations with custom architectures); the run directory keeps
    it as model_config.json (native format, any heterogeneous model), so `load_run`, `nemojax eval` and
    `generate` rebuild it.
    `initial_model`: start from its weights instead of a fresh init (its config is the run's model
    config); a resumed run starts from its checkpoint instead. `loss_fn(model, batch) -> (loss, metrics)`
    replaces the LM loss (see `step.lm_loss`); its metrics must include "ce" and "accuracy", and every
    total among them (a name without "/") is evaluated on held-out data too. `batch_fn(batch) -> batch`
    is applied to every batch on the device before a step or an evaluation (e.g. to add a teacher's
    outputs, computed outside the compiled step).
    Everything is validated before anything is written to `tc.out_dir`. Raises `TrainingDiverged` when
    the loss or the gradients stop being finite."""
    out = Path(tc.out_dir)
    if initial_model is not None:
        if model_config is not None and model_config != initial_model.cfg:
            raise ValueError("model_config: differs from initial_model.cfg; give one or the other")
        model_config = initial_model.cfg
    model_config = model_config or presets.get(tc.preset)
    ckpt = Checkpointer(out, create=False)
    latest = ckpt.latest_step()
    changes = _resume_checks(tc, out, model_config, latest) if latest is not None else {}
    if latest is None and tc.resume_step is not None:
        raise ValueError(f"resume_step {tc.resume_step}: {out} holds no checkpoints")
    if tc.resume_step is not None and tc.resume_step not in ckpt.steps():
        raise ValueError(f"resume_step {tc.resume_step}: no such checkpoint in {ckpt.directory}; available steps: "
                         f"{ckpt.steps()}")

    ds, ds_eval = make_dataset(tc), make_dataset(tc, "validation")
    mesh = make_train_mesh(tc)
    state_like = jax.eval_shape(lambda: init_state(tc, build_model(tc, ds.vocab_size, model_config))[2])
    if not tc.skip_memory_check:
        memory.check(memory.estimate(tc, model_config, state_like, mesh), memory.available())

    model = build_model(tc, ds.vocab_size, model_config, mesh, weights=initial_model)  # a checkpoint overrides it
    graphdef, tx, state = init_state(tc, model)
    grad_shardings = None
    if mesh is not None:
        state = shard_train_state(state, tx, mesh)
        grad_shardings = to_shardings(param_specs(state["params"], mesh), mesh)
        replicated = fsdp_replicated(state["params"], mesh)
        if replicated:
            _say(f"fsdp={mesh.shape['fsdp']} divides no dimension of {len(replicated)} matrices, so every device "
                 f"keeps them whole: {', '.join(replicated)}")

    def read(dataset, step):
        return load_batch(dataset, step, mesh)

    def load(dataset, step):
        return read(dataset, step) if batch_fn is None else batch_fn(read(dataset, step))

    train_step = make_train_step(graphdef, tx, tc, grad_shardings, loss_fn)
    eval_step = make_eval_step(graphdef, tc, loss_fn)

    def run_eval(state):
        return evaluate(eval_step, state, ds_eval, tc.eval_batches, load)

    summary, segment = {}, {"start_step": 0}
    if latest is not None:
        try:
            state, record, skipped = ckpt.restore_intact(state, tc.resume_step)
        except CheckpointMismatch as err:
            changed = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
            raise CheckpointMismatch(f"{err}; settings changed since it was saved: {changed or 'none'}") from None
        summary = record.get("summary", {})
        restored = int(state["step"])
        why = dict(skipped)
        for step in [s for s in ckpt.steps() if s > restored]:
            folder = "damaged_checkpoints" if step in why else "superseded_checkpoints"
            moved = ckpt.set_aside(step, folder)
            _say(f"checkpoint step {step} skipped and moved to {moved}: "
                 + (why[step] if step in why else f"resuming from step {restored} as asked (--resume-step)"))
        segment.update(start_step=restored, resumed_from=restored, skipped_checkpoints=sorted(why))
        if changes:
            summary.setdefault("config_changes", []).append({"step": restored, "changed": changes})
            _say(f"resuming at step {restored} with changed settings: {changes}")
    main = is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        tc.save(out / "train_config.json")
        model_config.save(out / "model_config.json")

    if latest is None:
        summary["initial_eval"] = run_eval(state)
        summary["eval_tokens"] = eval_tokens(ds_eval, tc.eval_batches, read)
    start = int(state["step"])
    log = MetricsLog(out / "metrics.jsonl", start if latest is not None else None) if main else None
    if start == 0 and main:
        log.write({"step": 0, **eval_record(summary["initial_eval"])})
    if start < tc.steps:  # a re-run of a finished run adds no segment and compiles nothing
        summary.setdefault("segments", []).append(segment)
        # compiled before the progress bar starts, so that its rate and ETA count steps only
        train_step.lower(state, load(ds, start)).compile()
        eval_step.lower(state, load(ds_eval, 0)).compile()
        compile_fingerprints(state)
    tokens_per_step = tc.batch_size * tc.seq_len
    last_saved = start if latest is not None else None

    def save(step, interrupted):
        segment.update(end_step=step, seconds=time.perf_counter() - t0, interrupted=interrupted)
        summary["seconds_total"] = sum(s["seconds"] for s in summary["segments"])
        # a copy: orbax may serialise the record after the loop has moved on
        ckpt.save(step, state, {"step": step, "summary": json.loads(json.dumps(summary, default=float))})

    interrupted = None
    try:
        with _stop_requests() as flag, tqdm(total=tc.steps, initial=start, desc=f"train {tc.preset}",
                                            disable=quiet or not main, unit="step") as bar:
            stop = _agreed_stop(flag, mesh)
            t0 = t_last = time.perf_counter()
            pending = None  # the previous step's (step, metrics), checked once the next step is queued
            for step in range(start, tc.steps):
                state, metrics = train_step(state, load(ds, step))
                if pending is not None:
                    _check_finite(*pending, tc, last_saved)
                done = step + 1
                pending = (done, metrics)
                if done % tc.log_every == 0 or done == tc.steps:
                    record = {k: v for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    record.update(step=done,
                                  tokens_per_s=tokens_per_step * min(tc.log_every, done - start) / (now - t_last))
                    t_last = now
                    if done % tc.eval_every == 0 or done == tc.steps:
                        record.update(eval_record(run_eval(state)))
                    if main:
                        log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                signum = stop()
                if signum is not None:
                    interrupted = signal.Signals(signum).name
                # every way out of the loop passes a save, so the segment's time is the saved one
                if done % tc.save_every == 0 or done == tc.steps or interrupted:
                    _check_finite(*pending, tc, last_saved)  # a diverged state is never saved
                    save(done, interrupted)
                    last_saved = done
                if interrupted:
                    break
    except TrainingDiverged as err:
        summary["diverged"] = str(err)
        if main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        raise
    finally:
        ckpt.close()  # waits for the last save

    step = int(state["step"])
    summary.update(step=step, interrupted=interrupted,
                   seconds_total=sum(s["seconds"] for s in summary.get("segments", [])))
    if step == tc.steps and interrupted is None:
        summary["final_eval"] = run_eval(state)
        if ds.tokenizer is None or tc.sample_tokens > 0:
            model = local_copy(graphdef, state)  # every process takes part in the gathering
            if main and ds.tokenizer is None:
                summary["sample"] = sample_task(model, ds_eval)
            elif main:
                summary["sample"] = sample_text(model, ds, tc.sample_prompt, tc.sample_tokens, tc.seed)
    if main:
        records = read_metrics(out / "metrics.jsonl")
        if records:
            plot_metrics(records, out / "loss.png", title=f"{tc.preset} on {tc.data}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def eval_record(ev: dict) -> dict:
    """An evaluation as metrics.jsonl logs it: eval_loss is the held-out CE (whatever the training loss
    is), beside the loss function's other terms; the objective's total and the MoE statistics are left out."""
    rest = {f"eval_{k}": v for k, v in ev.items() if k not in ("ce", "accuracy", "loss") and not k.startswith("moe_")}
    return {"eval_loss": ev["ce"], "eval_accuracy": ev["accuracy"], **rest}


def eval_tokens(ds, n_batches: int, load=None) -> int:
    """How many target tokens the first `n_batches` batches of `ds` score (what `evaluate` averages over),
    batch i read by `load(ds, i)` (default: `ds.batch(i)`)."""
    load = (lambda d, i: d.batch(i)) if load is None else load
    return int(sum(jnp.sum(load(ds, i)["targets"] != losses.IGNORE) for i in range(n_batches)))


def load_run(run_dir, step: int | None = None):
    """(TrainConfig, model with the checkpoint's weights, record) of a run directory written by `train`."""
    run_dir = Path(run_dir)
    if not (run_dir / "train_config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a nemojax run directory (no train_config.json)")
    tc = TrainConfig.load(run_dir / "train_config.json")
    mc = ModelConfig.load(run_dir / "model_config.json")
    vocab = make_dataset(tc).vocab_size
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(tc, vocab, mc)), nnx.Param, ...)[0]
    like = jax.eval_shape(lambda: init_state(tc, build_model(tc, vocab, mc))[2])
    ckpt = Checkpointer(run_dir, create=False)
    state, record = ckpt.restore(like, step)
    ckpt.close()
    model = merged(graphdef, state)
    configure_moe(model, capacity_factor=None, expert_mesh=None, collect_stats=False)  # inference: dropless, no stats
    return tc, model, record
