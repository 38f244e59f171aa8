"""Low-precision training study (issue 15): one small hybrid Mamba/attention/MoE model trained on the
standard library's source (`--data stdlib`, byte-level) with the same seed, data and schedule in

  bf16                  the unquantised matmuls (in the compute dtype, float32 here)
  fp8                   E4M3 weights and activations, E5M2 gradients, per-tensor scaling; first and
                        last layer unquantised (the recipe's default)
  nvfp4                 the NVFP4 pretraining recipe (16x16 weight tiles, random Hadamard transform on the
                        Wgrad inputs, stochastic rounding of gradients, the recipe's BF16 layers)
  nvfp4-no-2d / -no-rht / -no-sr / -no-bf16-layers
                        the recipe with one part switched off (`--precision-disable`, or
                        `--high-precision-layers first=0,last=0`): the NVFP4 paper's ablations
  nvfp4-then-bf16       the nvfp4 run resumed from its checkpoint at --switch-fraction of the steps with
                        every matmul unquantised (`--precision bf16 --allow-changes`)
  bf16-seed1            the bf16 run with another seed (initial weights and data order): how far two
                        unquantised runs land apart, the yardstick for the differences above

Every run is `nemojax.train.train` (what `nemojax train` runs) into experiments/precision/runs/training/,
so an interrupted run resumes and a finished one is skipped. The report reads each run's metrics.jsonl
(training loss per logged step, held-out loss at each evaluation) and summary.json, and evaluates the
final weights of every quantised run on the same held-out batches without quantisation too. Writes
results/training.json and results/training_loss.png.

    python experiments/precision/training.py             # train (or resume) every run, then report
    python experiments/precision/training.py --report    # only the report, from the finished runs
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import nemojax as nj
from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, ModelConfig, MoESpec, from_pattern
from nemojax.quant.training import configure_precision
from nemojax.train import TrainConfig, train
from nemojax.train.loop import load_run, make_dataset
from nemojax.train.metrics import read_metrics
from nemojax.train.step import evaluate, make_eval_step

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = HERE / "runs" / "training"
RESULTS = HERE / "results"
# 120 steps of 16 x 128 bytes: the whole study (9 runs) in about half an hour on the shared 2-core CPU
RECIPE = dict(data="stdlib", seq_len=128, batch_size=16, steps=120, lr=3e-3, eval_every=12, eval_batches=8,
              save_every=24, log_every=3, sample_tokens=0)
SWITCH_FRACTION = 0.8  # a checkpoint step (save_every)
TAIL = 0.2  # the final training loss: the mean of the logged losses over this last fraction of the steps
# name -> the TrainConfig fields that differ from RECIPE
RUN_SETTINGS = {
    "bf16": {},
    "fp8": {"precision": "fp8"},
    "nvfp4": {"precision": "nvfp4"},
    "nvfp4-no-2d": {"precision": "nvfp4", "precision_disable": "weight_blocks_2d"},
    "nvfp4-no-rht": {"precision": "nvfp4", "precision_disable": "hadamard"},
    "nvfp4-no-sr": {"precision": "nvfp4", "precision_disable": "stochastic_rounding"},
    "nvfp4-no-bf16-layers": {"precision": "nvfp4", "high_precision_layers": "first=0,last=0"},
    "nvfp4-then-bf16": {"precision": "bf16", "allow_changes": True},  # resumed from nvfp4's checkpoint
    "bf16-seed1": {"seed": 1},
}


def model_config() -> ModelConfig:
    """Every quantisable kind (Mamba, attention, dense MLP, MoE with a shared expert), 6 layers of width
    192: about 2M parameters, 1.1M active. The recipes' default BF16 layers are the first and the last."""
    return from_pattern(
        "ME*EM-", vocab_size=256, hidden_size=192, name="precision-study",
        mamba=MambaSpec(num_heads=6, head_dim=32, n_groups=1, state_size=32, chunk_size=64),
        attention=AttentionSpec(num_heads=6, num_kv_heads=3, head_dim=32), mlp=MLPSpec(576),
        moe=MoESpec(num_experts=8, top_k=2, intermediate_size=192, shared_intermediate_size=192,
                    routed_scaling_factor=2.5))


def switch_step() -> int:
    return round(SWITCH_FRACTION * RECIPE["steps"])


def train_config(run: str) -> TrainConfig:
    return TrainConfig(out_dir=str(RUNS / run), **(RECIPE | RUN_SETTINGS[run]))


def command(run: str) -> str:
    """The `nemojax train` flags of a run (the model config is this script's: `model_config`)."""
    settings = RECIPE | {k: v for k, v in RUN_SETTINGS[run].items() if k != "allow_changes"}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
    extra = f" --resume-step {switch_step()} --allow-changes" if run == "nvfp4-then-bf16" else ""
    return f"nemojax train {flags}{extra} --out-dir experiments/precision/runs/training/{run}"


def finished(run: str) -> bool:
    path = RUNS / run / "summary.json"
    return path.exists() and json.loads(path.read_text()).get("step") == RECIPE["steps"]


def run_training(run: str) -> None:
    """Trains `run`, or continues it; a finished run is skipped. Adds the wall time of this call (compiles
    included) to the run directory's wall_seconds.json."""
    if finished(run):
        print(f"{run}: finished, skipped", flush=True)
        return
    tc = train_config(run)
    if run == "nvfp4-then-bf16" and not (RUNS / run).exists():
        if not finished("nvfp4"):
            raise RuntimeError("nvfp4-then-bf16 continues the nvfp4 run: train it first")
        shutil.copytree(RUNS / "nvfp4", RUNS / run)  # continued from its switch checkpoint
        for name in ("summary.json", "wall_seconds.json"):  # the nvfp4 run's, not this one's
            (RUNS / run / name).unlink()
        tc = dataclasses.replace(tc, resume_step=switch_step())
    t0 = time.perf_counter()
    train(tc, model_config=model_config(), quiet=True)
    wall = RUNS / run / "wall_seconds.json"
    spent = json.loads(wall.read_text()) if wall.exists() else []
    wall.write_text(json.dumps(spent + [time.perf_counter() - t0]) + "\n")
    print(f"{run}: done", flush=True)


def held_out_loss(model, tc: TrainConfig) -> float:
    """The trainer's held-out evaluation (the first eval_batches validation batches) of `model` as it is."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ev = evaluate(make_eval_step(graphdef, tc), {"params": params, "rest": rest}, make_dataset(tc, "validation"),
                  tc.eval_batches)
    return ev["ce"]


def run_record(run: str) -> dict:
    tc, model, record = load_run(RUNS / run)
    summary = json.loads((RUNS / run / "summary.json").read_text())
    records = read_metrics(RUNS / run / "metrics.jsonl")
    first, last = tc.high_precision_counts(len(model.cfg.layers))
    n = len(model.cfg.layers)
    quantised = [i for i in range(n) if tc.precision != "bf16" and first <= i < n - last]
    tail = [r["loss"] for r in records if "loss" in r and r["step"] > RECIPE["steps"] * (1 - TAIL)]
    out = {"precision": tc.precision, "precision_disable": tc.precision_disable, "seed": tc.seed,
           "quantised_layers": quantised, "train_seconds": summary["seconds_total"],
           "wall_seconds": sum(json.loads((RUNS / run / "wall_seconds.json").read_text())),
           "config_changes": summary.get("config_changes", []),
           "final_train_loss": float(np.mean(tail)), "final_train_loss_steps": len(tail),
           "held_out_loss": summary["final_eval"]["ce"],
           "curve": {"train": [[r["step"], r["loss"]] for r in records if "loss" in r],
                     "held_out": [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r]}}
    if tc.precision != "bf16":  # the same weights with every matmul unquantised
        configure_precision(model, None)
        out["held_out_loss_unquantised"] = held_out_loss(model, tc)
    print(run, {k: v for k, v in out.items() if k != "curve"}, flush=True)
    return out


def report() -> dict:
    tc = train_config("bf16")
    val = make_dataset(tc, "validation")
    out = {"meta": {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
                    "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                    "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                    "model": model_config().to_dict(), "pattern": model_config().pattern,
                    "parameters": nj.param_counts(model_config()), "recipe": RECIPE,
                    "tokens_per_step": RECIPE["batch_size"] * RECIPE["seq_len"],
                    "held_out_tokens": RECIPE["eval_batches"] * RECIPE["batch_size"] * RECIPE["seq_len"],
                    "corpus": val.corpus, "switch_step": switch_step(), "switch_fraction": SWITCH_FRACTION,
                    "commands": {run: command(run) for run in RUN_SETTINGS}},
           "runs": {run: run_record(run) for run in RUN_SETTINGS}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(out)
    return out


def plot(d: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = d["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = (("bf16", "fp8", "nvfp4", "nvfp4-then-bf16", "bf16-seed1"),
              ("nvfp4", "nvfp4-no-2d", "nvfp4-no-rht", "nvfp4-no-sr", "nvfp4-no-bf16-layers"))
    color = {run: plt.cm.tab10(i) for i, run in enumerate(runs)}  # one colour per run in both panels
    base = dict(map(tuple, runs["bf16"]["curve"]["held_out"]))
    ax = axes[0]
    for run in groups[0]:
        steps, losses = zip(*runs[run]["curve"]["train"])
        kernel = np.ones(5) / 5  # five logged steps: the per-batch noise would hide the curves
        ax.plot(steps[2:-2], np.convolve(losses, kernel, mode="valid"), lw=1.2, color=color[run], label=run)
    ax.set(xlabel="step", ylabel="training loss (nats / byte, 5-point mean)", ylim=(None, 3.5),
           title="Training loss")
    ax.axvline(d["meta"]["switch_step"], color="grey", ls=":", lw=1)
    ax = axes[1]
    for run in dict.fromkeys(groups[0] + groups[1]):
        pts = [(s, loss - base[s]) for s, loss in runs[run]["curve"]["held_out"] if s > 0]
        ax.plot(*zip(*pts), "o-", ms=3, lw=1, color=color[run], label=run)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="step", ylabel="held-out loss - bf16's (nats / byte)", title="Held-out loss against bf16")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{d['meta']['pattern']} ({d['meta']['parameters']['total'] / 1e6:.1f}M parameters), "
                 f"{d['meta']['recipe']['steps']} steps of {d['meta']['tokens_per_step']} bytes of stdlib source")
    fig.tight_layout()
    fig.savefig(RESULTS / "training_loss.png", dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", action="store_true", help="only evaluate the finished runs and write the results")
    args = p.parse_args(argv)
    if not args.report:
        for run in RUN_SETTINGS:
            run_training(run)
    report()


if __name__ == "__main__":
    main()
