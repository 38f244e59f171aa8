"""MQAR ablation: Mamba-only vs attention-only vs hybrid vs hybrid-MoE at matched parameter counts,
over sequence lengths and numbers of key-value pairs (the Zoology recall benchmark).

    python experiments/mqar_ablation.py                 # L in {64, 128} x kv in {4, 16}, seeds 0 and 1
    python experiments/mqar_ablation.py --quick         # L = 64, kv = 4, one seed, 500 steps: ~5 min

The default sweep is 32 runs of 2000 steps: about 2 hours on 2 CPU cores. Every run is an ordinary
`nemojax.train` run directory under --runs/steps{S}_vocab{V}_lr{LR} (interrupt and re-run: finished
runs are read back, an unfinished one resumes from its checkpoint). Writes
experiments/results/mqar_ablation.json (every run, and the mean / min / max over seeds per cell)
and mqar_ablation.png (the mean, with the seed range as error bars).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, MoESpec, from_pattern
from nemojax.nn.model import param_counts
from nemojax.train import TrainConfig, train

HERE = Path(__file__).parent
HIDDEN = 64
# Two sequence mixers and two FFNs each; head sizes chosen so a Mamba mixer (~15K parameters) and an
# attention mixer (~16K) cost about the same, and the 4-expert top-1 MoE FFN has the dense FFN's
# parameter count (its active count is a quarter of it).
MAMBA = MambaSpec(num_heads=4, head_dim=16, n_groups=1, state_size=16, chunk_size=32)
ATTN = AttentionSpec(num_heads=4, num_kv_heads=4, head_dim=16)
MLP = MLPSpec(intermediate_size=128)
MOE = MoESpec(num_experts=4, top_k=1, intermediate_size=32)
ARCHS = {"mamba": "M-M-", "attention": "*-*-", "hybrid": "M-*-", "hybrid-moe": "ME*E"}


def model_config(arch: str, vocab: int):
    return from_pattern(ARCHS[arch], vocab_size=vocab, hidden_size=HIDDEN, name=f"mqar-{arch}", mamba=MAMBA,
                        attention=ATTN, mlp=MLP, moe=MOE)


def run_one(arch, seq_len, kv, seed, args):
    tc = TrainConfig(preset="tiny-hybrid", data="mqar", data_options={"num_kv_pairs": kv, "vocab_size": args.vocab},
                     seq_len=seq_len, batch_size=args.batch, steps=args.steps, lr=args.lr,
                     warmup_steps=args.steps // 10, weight_decay=0.0, eval_every=args.steps, save_every=args.steps,
                     eval_batches=4, log_every=max(args.steps // 20, 1), seed=seed,
                     out_dir=str(args.runs / f"steps{args.steps}_vocab{args.vocab}_lr{args.lr:g}"
                                 / f"{arch}_L{seq_len}_kv{kv}_seed{seed}"))
    summary = Path(tc.out_dir) / "summary.json"
    if summary.exists() and "final_eval" in json.loads(summary.read_text()):
        return json.loads(summary.read_text())
    s = train(tc, model_config=model_config(arch, args.vocab), quiet=True)
    if s["interrupted"]:  # train() saved and returned; end the sweep too (re-run to continue)
        raise SystemExit(f"interrupted by {s['interrupted']} during {tc.out_dir}; re-run to resume")
    return s


def cells(rows):
    """Mean / min / max accuracy over seeds for each (arch, L, kv)."""
    out = {}
    for r in rows:
        out.setdefault((r["arch"], r["seq_len"], r["num_kv_pairs"]), []).append(r["accuracy"])
    return [{"arch": a, "seq_len": L, "num_kv_pairs": kv, "seeds": len(acc), "accuracy_mean": sum(acc) / len(acc),
             "accuracy_min": min(acc), "accuracy_max": max(acc)} for (a, L, kv), acc in out.items()]


def plot(rows, grid_lengths, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = cells(rows)
    kvs = sorted({c["num_kv_pairs"] for c in cs})
    fig, axes = plt.subplots(1, len(grid_lengths), figsize=(4.2 * len(grid_lengths), 3.6), squeeze=False)
    for ax, L in zip(axes[0], grid_lengths):
        for arch in ARCHS:
            pts = sorted((c["num_kv_pairs"], c["accuracy_mean"], c["accuracy_mean"] - c["accuracy_min"],
                          c["accuracy_max"] - c["accuracy_mean"])
                         for c in cs if c["arch"] == arch and c["seq_len"] == L)
            if pts:
                kv, mean, lo, hi = zip(*pts)
                ax.errorbar(kv, mean, yerr=[lo, hi], fmt="o-", capsize=3, label=arch)
        ax.set(xscale="log", xlabel="key-value pairs", ylabel="recall accuracy", title=f"MQAR, L = {L}", ylim=(0, 1.02))
        ax.set_xticks(kvs, [str(k) for k in kvs])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only L=64, kv=4, seed 0, 500 steps")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    p.add_argument("--kv", type=int, nargs="+", default=[4, 16])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--runs", type=Path, default=Path("runs/mqar_ablation"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.kv, args.seeds, args.steps = [64], [4], [0], 500
    grid = [(L, kv) for L in args.lengths for kv in args.kv if 4 * kv <= L]
    params = {a: param_counts(model_config(a, args.vocab)) for a in ARCHS}
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    # seed-major: a sweep stopped early still has every cell for its first seeds
    for seed, (L, kv), arch in tqdm([(s, g, a) for s in args.seeds for g in grid for a in ARCHS], desc="mqar runs"):
        s = run_one(arch, L, kv, seed, args)
        rows.append({"arch": arch, "pattern": ARCHS[arch], "seq_len": L, "num_kv_pairs": kv, "seed": seed,
                     "accuracy": s["final_eval"]["accuracy"], "loss": s["final_eval"]["ce"],
                     "params_total": params[arch]["total"], "params_active": params[arch]["active"],
                     "seconds": s["seconds_total"]})
        # rewritten after every run, so an interrupted sweep keeps its finished part
        (args.out / "mqar_ablation.json").write_text(json.dumps(
            {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
             "cells": cells(rows), "rows": rows},
            indent=2))
        plot(rows, args.lengths, args.out / "mqar_ablation.png")
    print(f"mean accuracy over seeds {args.seeds}")
    print(f"{'arch':<11} {'params':>8} {'active':>8}  " + "  ".join(f"L{L}/kv{kv}" for L, kv in grid))
    for arch in ARCHS:
        acc = {(c["seq_len"], c["num_kv_pairs"]): c["accuracy_mean"] for c in cells(rows) if c["arch"] == arch}
        print(f"{arch:<11} {params[arch]['total']:>8} {params[arch]['active']:>8}  "
              + "  ".join(f"{acc.get(g, float('nan')):>9.3f}" for g in grid))


if __name__ == "__main__":
    main()
