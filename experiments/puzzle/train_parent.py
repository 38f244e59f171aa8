"""The Puzzle study's parent, and the small baselines it must clearly beat, trained with one recipe on the
standard library's source (`--data stdlib`, validation = whole held-out files).

    python experiments/puzzle/train_parent.py             # train (or resume) every run, then report
    python experiments/puzzle/train_parent.py --only parent
    python experiments/puzzle/train_parent.py --report    # only re-evaluate the finished runs

Each run is `nemojax.train.train` (what `nemojax train` runs); the parent's run is exactly

    nemojax train --preset puzzle-parent --data stdlib --seq-len 256 --batch-size 16 --steps 600 --lr 0.003 \
        --eval-every 100 --eval-batches 8 --save-every 50 --log-every 10 --sample-tokens 0 \
        --out-dir experiments/puzzle/runs/parent

Run directories live under experiments/puzzle/runs/ (git-ignored) and resume when re-run. The report
evaluates every finished run on the same tokens: every window of the held-out files, and as many
windows of the training files from the batches of the run's first steps (trained on, once: the runs
see less than an epoch) and from the batches just after its last step (never trained on). Seen vs
unseen training windows measures memorisation; unseen training windows vs held-out files measures
how far the held-out files differ. It writes results/parent.json and results/parent_loss.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import nemojax as nj
from nemojax.config import ModelConfig
from nemojax.train import TrainConfig, train
from nemojax.train.loop import load_run, make_dataset
from nemojax.train.metrics import read_metrics
from nemojax.train.sample import sample_text

HERE = Path(__file__).parent
RUNS = HERE / "runs"
RESULTS = HERE / "results"
SAMPLE_PROMPT = "    def "
RECIPE = dict(data="stdlib", seq_len=256, batch_size=16, steps=600, lr=3e-3, eval_every=100, eval_batches=8,
              save_every=50, log_every=10, sample_tokens=0)


def two_layer() -> ModelConfig:
    """The parent's Mamba and MLP layers, one of each: the same width, a fifth of the depth."""
    parent = nj.presets.get("puzzle-parent")
    mamba = next(s for s in parent.layers if s.kind == "mamba")
    mlp = next(s for s in parent.layers if s.kind == "mlp")
    return ModelConfig(vocab_size=parent.vocab_size, hidden_size=parent.hidden_size, layers=(mamba, mlp),
                       name="two-layer")


# run name -> (preset the TrainConfig names, model config that overrides it or None)
MODELS = {"parent": ("puzzle-parent", None), "tiny-hybrid": ("tiny-hybrid", None),
          "two-layer": ("puzzle-parent", two_layer)}


def command(run: str) -> str:
    """The `nemojax train` command line of a run that has a preset of its own."""
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in RECIPE.items())
    return f"nemojax train --preset {MODELS[run][0]} {flags} --out-dir experiments/puzzle/runs/{run}"


def train_config(run: str) -> TrainConfig:
    return TrainConfig(preset=MODELS[run][0], out_dir=str(RUNS / run), **RECIPE)


def run_training(run: str) -> None:
    make = MODELS[run][1]
    train(train_config(run), model_config=make() if make else None)


def evaluate(model, ds, steps) -> dict:
    """Mean next-token loss and accuracy over the batches `steps` of `ds` (every target scored)."""
    @nnx.jit
    def sums(model, inputs, targets):
        logits = model(inputs).astype(jnp.float32)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return ce.sum(), (logits.argmax(-1) == targets).sum()

    ce = correct = n = 0
    for i in steps:
        b = ds.batch(i)
        s, c = sums(model, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]))
        ce, correct, n = ce + float(s), correct + int(c), n + b["targets"].size
    return {"loss": ce / n, "accuracy": correct / n, "tokens": n}


def report(runs) -> dict:
    out = {"date": datetime.date.today().isoformat(), "jax": jax.__version__, "cpus": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "recipe": RECIPE, "runs": {}}
    for run in runs:
        tc, model, record = load_run(RUNS / run)
        val = make_dataset(tc, "validation")
        n_val = val.n_windows // tc.batch_size  # every validation window (an epoch's first batches hold each once)
        summary = record["summary"]
        train_ds = make_dataset(tc)
        held_out, seen = evaluate(model, val, range(n_val)), evaluate(model, train_ds, range(n_val))
        unseen = evaluate(model, train_ds, range(tc.steps, tc.steps + n_val))
        assert (tc.steps + n_val) * tc.batch_size <= train_ds.n_windows, "unseen windows must be in the first epoch"
        out["corpus"] = val.corpus
        out["runs"][run] = {
            "preset": tc.preset, "model": model.cfg.name, "pattern": "".join(s.symbol for s in model.cfg.layers),
            "parameters": nj.param_counts(model.cfg), "step": int(record["step"]),
            "tokens_seen": int(record["step"]) * tc.batch_size * tc.seq_len,
            "train_seconds": summary["seconds_total"],
            "held_out": held_out, "train_seen": seen, "train_unseen": unseen,
            "memorisation_gap": unseen["loss"] - seen["loss"], "held_out_gap": held_out["loss"] - seen["loss"],
            "held_out_perplexity": math.exp(held_out["loss"]),
        }
        if run == "parent":
            out["parent_sample"] = {"prompt": SAMPLE_PROMPT, "temperature": 0.8, "top_k": 40,
                                    "text": sample_text(model, train_ds, SAMPLE_PROMPT, 240, tc.seed)}
        print(run, json.dumps(out["runs"][run]))
    out["epochs"] = out["runs"]["parent"]["tokens_seen"] / (out["corpus"]["bytes"] - out["corpus"]["validation_bytes"])
    out["parent_command"] = command("parent")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "parent.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(runs)
    return out


def plot(runs) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        recs = read_metrics(RUNS / run / "metrics.jsonl")
        tokens = RECIPE["batch_size"] * RECIPE["seq_len"]
        train_pts = [(r["step"] * tokens, r["loss"]) for r in recs if "loss" in r]
        eval_pts = [(r["step"] * tokens, r["eval_loss"]) for r in recs if "eval_loss" in r and r["step"] > 0]
        line, = ax.plot(*zip(*train_pts), alpha=0.5, lw=1, label=f"{run} (train)")
        ax.plot(*zip(*eval_pts), "o-", color=line.get_color(), label=f"{run} (held-out files)")
    ax.set(xlabel="tokens seen", ylabel="loss (nats / byte)", ylim=(0.5, 3.5),
           title="Puzzle parent vs baselines on the stdlib corpus")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "parent_loss.png", dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(MODELS), action="append", help="train only these runs (repeatable)")
    p.add_argument("--report", action="store_true", help="only evaluate the finished runs and write the results")
    args = p.parse_args(argv)
    if not args.report:
        for run in args.only or MODELS:
            run_training(run)
    if args.report or not args.only:
        report(list(MODELS))


if __name__ == "__main__":
    main()
