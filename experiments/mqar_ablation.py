"""MQAR ablation: Mamba-only vs attention-only vs hybrid vs hybrid-MoE at matched parameter counts,
over sequence lengths and numbers of key-value pairs (the Zoology recall benchmark).

    python experiments/mqar_ablation.py                 # L in {64, 128} x kv in {4, 16}: ~40 min on 2 CPU cores
    python experiments/mqar_ablation.py --quick         # L = 64, kv = 4 only: ~8 min

Every run is an ordinary `nemojax.train` run directory under --runs (interrupt and re-run: finished
runs are read back, an unfinished one resumes from its checkpoint). Writes
experiments/results/mqar_ablation.json (table) and mqar_ablation.png.
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


def run_one(arch, seq_len, kv, args):
    tc = TrainConfig(preset="tiny-hybrid", data="mqar", data_options={"num_kv_pairs": kv, "vocab_size": args.vocab},
                     seq_len=seq_len, batch_size=args.batch, steps=args.steps, lr=args.lr,
                     warmup_steps=args.steps // 10, weight_decay=0.0, eval_every=args.steps, save_every=args.steps,
                     eval_batches=4, log_every=max(args.steps // 20, 1), out_dir=str(args.runs / f"{arch}_L{seq_len}_kv{kv}"),
                     seed=args.seed)
    summary = Path(tc.out_dir) / "summary.json"
    if summary.exists() and "final_eval" in json.loads(summary.read_text()):
        return json.loads(summary.read_text())
    s = train(tc, model_config=model_config(arch, args.vocab), quiet=True)
    if s["interrupted"]:  # train() saved and returned; end the sweep too (re-run to continue)
        raise SystemExit(f"interrupted by {s['interrupted']} during {tc.out_dir}; re-run to resume")
    return s


def plot(rows, grid_lengths, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grid_lengths), figsize=(4.2 * len(grid_lengths), 3.6), squeeze=False)
    for ax, L in zip(axes[0], grid_lengths):
        for arch in ARCHS:
            pts = sorted((r["num_kv_pairs"], r["accuracy"]) for r in rows if r["arch"] == arch and r["seq_len"] == L)
            if pts:
                ax.plot(*zip(*pts), "o-", label=arch)
        ax.set(xscale="log", xlabel="key-value pairs", ylabel="recall accuracy", title=f"MQAR, L = {L}", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only L=64, kv=4")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    p.add_argument("--kv", type=int, nargs="+", default=[4, 16])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=Path, default=Path("runs/mqar_ablation"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.kv = [64], [4]
    grid = [(L, kv) for L in args.lengths for kv in args.kv if 4 * kv <= L]
    params = {a: param_counts(model_config(a, args.vocab)) for a in ARCHS}
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for (L, kv), arch in tqdm([(g, a) for g in grid for a in ARCHS], desc="mqar runs"):
        s = run_one(arch, L, kv, args)
        rows.append({"arch": arch, "pattern": ARCHS[arch], "seq_len": L, "num_kv_pairs": kv,
                     "accuracy": s["final_eval"]["accuracy"], "loss": s["final_eval"]["ce"],
                     "params_total": params[arch]["total"], "params_active": params[arch]["active"],
                     "seconds": s["seconds_this_run"]})
        # rewritten after every run, so an interrupted sweep keeps its finished part
        (args.out / "mqar_ablation.json").write_text(json.dumps(
            {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows},
            indent=2))
        plot(rows, args.lengths, args.out / "mqar_ablation.png")
    print(f"{'arch':<11} {'params':>8} {'active':>8}  " + "  ".join(f"L{L}/kv{kv}" for L, kv in grid))
    for arch in ARCHS:
        acc = {(r["seq_len"], r["num_kv_pairs"]): r["accuracy"] for r in rows if r["arch"] == arch}
        print(f"{arch:<11} {params[arch]['total']:>8} {params[arch]['active']:>8}  "
              + "  ".join(f"{acc.get(g, float('nan')):>9.3f}" for g in grid))


if __name__ == "__main__":
    main()
