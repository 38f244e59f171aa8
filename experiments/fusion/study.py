"""The FFN Fusion study (issue 14), on the trained Puzzle parent (experiments/puzzle, pattern ME*EM-ME*E).

    python experiments/fusion/study.py     # a re-run resumes every distillation

The parent's layers alternate, so it has no run of FFN layers. As in the paper, where Puzzle's removed
attention leaves attention-free runs, the "base" here is the parent with its attention layer 2 and
Mamba layers 4 and 6 removed (no-ops), distilled from the parent (cosine on every layer + KL): its
FFN layers 1, 3, 5 and 7 (MoE, MoE, MLP, MoE) are one run, followed by attention 8 and MoE 9.

On the base, measured against it on held-out batches 4-11 (batches 0-3 rank and plan):
- progressive fusion: layers 1-3 (two MoEs), 1-5 (the run without its last FFN), 1-7 (all of it);
- the last FFN fused or left out: 3-7 against 1-5 (three FFNs each);
- fused against run sequentially in reversed order (layers 5, 3, 1);
- norm="last" (the paper's shared norm) against norm="fold" (each FFN keeps its own);
- at equal measured latency, fusion against removing the least important FFN layers (replace-one KL);
- the residual statistics of every layer (cos-dist(x, f(x)), |h|/|x|, cos(h, x)).
On the parent itself: full-block parallelisation of 2-, 3- and 4-layer windows, chosen greedily from
its dependency matrix, adding windows until quality collapses.
Every fused or pruned child is evaluated before and after distillation from the model it came from;
whole-model prefill and decode latency are measured in one process, interleaved.
Writes results/study.json, results/study.png and the dependency heatmaps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import jax
import numpy as np

from nemojax.compress import fusion
from nemojax.compress.fusion.fuse import FFN_KINDS
from nemojax.compress.puzzle import pipeline, score
from nemojax.compress.puzzle.distill import distill
from nemojax.config import NoOpSpec
from nemojax.nn.model import param_counts
from nemojax.train.loop import load_run

HERE = Path(__file__).parent
REMOVED = (2, 4, 6)  # attention 2, Mamba 4 and 6: FFN layers 1, 3, 5, 7 become one run
SCORE_BATCHES, EVAL_BATCHES = 4, 8
FUSIONS = {  # name: (start, stop, norm)
    "fuse 1-3": (1, 4, "last"), "fuse 1-5": (1, 6, "last"), "fuse 1-7": (1, 8, "last"),
    "fuse 3-7": (3, 8, "last"), "fuse 1-5 fold": (1, 6, "fold"), "fuse 1-7 fold": (1, 8, "fold"),
}
COLLAPSE = 0.5  # full-block windows are added until accuracy falls below this fraction of the parent's
LATENCY = {"batch": 8, "new_tokens": 384, "rounds": 5}


def reversed_run(model, layers):
    """`model` with the blocks of `layers` run sequentially in reversed order."""
    blocks = [model.layers[i] for i in layers]
    return model.replace_layers({i: (b.spec, b) for i, b in zip(layers, reversed(blocks))})


def ffn_importance(base, layers, score_batches) -> dict[int, float]:
    """Replace-one KL of removing each FFN layer (Puzzle's score)."""
    return {i: score.compare(base, base.replace_layers({i: (NoOpSpec(), None)}), score_batches)["kl"]
            for i in layers}


def base_children(base, importance: dict) -> dict:
    """The fused, reordered and pruned children of the base (removals take the FFN layers of least
    replace-one KL in `importance`, {layer: KL})."""
    least = sorted(importance, key=importance.get)
    children = {name: fusion.fuse(base, a, b, norm=norm) for name, (a, b, norm) in FUSIONS.items()}
    children["reversed 1-5"] = reversed_run(base, (1, 3, 5))
    for k in (1, 2):
        children[f"remove {k} FFN"] = base.replace_layers({int(i): (NoOpSpec(), None) for i in least[:k]})
    return children


def block_children(parent, blocks: dict) -> dict:
    """The parallelised parents of a finished study's "blocks" rows, rebuilt from their windows."""
    out = {}
    for size, rows in blocks.items():
        for n, row in enumerate(rows, start=1):
            child = parent
            for w in row["windows"]:
                child = fusion.parallelize(child, *w)
            out[f"blocks{size} x{n}"] = child
    return out


def latency(result: dict, models: dict, tc) -> None:
    """Whole-model prefill and decode latency of every model, measured together (`score.model_latency`) on
    LATENCY["batch"] held-out prompts of seq_len tokens (the rows after the evaluation's batches)."""
    prompts = pipeline.heldout_prompts(tc, LATENCY["batch"], tc.seq_len, first=SCORE_BATCHES + EVAL_BATCHES)
    result["latency"] = score.model_latency(models, prompts, new=LATENCY["new_tokens"], rounds=LATENCY["rounds"])
    result["latency_setting"] = {**LATENCY, "prompt": tc.seq_len, "prompts": "held-out text",
                                 "date": datetime.date.today().isoformat()}


def window_rows(parent, M, eval_b, parent_acc) -> dict:
    """Per window size: for 1, 2, ... of its greedy windows, the parallelised parent's windows, layers and
    quality; stops after the first child below COLLAPSE of the parent's accuracy."""
    out = {}
    for size in (2, 3, 4):
        windows = fusion.block_windows(parent.cfg, M, size=size)
        rows, child = [], parent
        for w in windows:
            child = fusion.parallelize(child, *w)
            rows.append({"windows": [list(x) for x in windows[:len(rows) + 1]], "pattern": child.cfg.pattern,
                         "before": score.compare(parent, child, eval_b)})
            print(f"  blocks of {size}: +{w} {child.cfg.pattern} acc {rows[-1]['before']['accuracy']:.4f}")
            if rows[-1]["before"]["accuracy"] < COLLAPSE * parent_acc:
                break
        out[str(size)] = rows
        jax.clear_caches()
    return out


def run(parent_run: Path, runs: Path, results: Path, *, base_steps: int, distill_steps: int, lr: float,
        batch: int) -> dict:
    tc, parent, _ = load_run(parent_run)
    score_b = pipeline.heldout_batches(tc, SCORE_BATCHES)
    eval_b = pipeline.heldout_batches(tc, EVAL_BATCHES, first=SCORE_BATCHES)
    kw = dict(lr=lr, quiet=True, batch_size=batch)

    print("base: parent without layers", REMOVED)
    pruned = parent.replace_layers({i: (NoOpSpec(), None) for i in REMOVED})
    distill(parent_run, pruned, runs / "base", steps=base_steps, **kw)
    base = load_run(runs / "base")[1]
    ffn = [i for i, s in enumerate(base.cfg.layers) if s.kind in FFN_KINDS]
    out = {"parent": {"pattern": parent.cfg.pattern, "params": param_counts(parent.cfg),
                      "eval": score.compare(parent, parent, eval_b)},
           "base": {"pattern": base.cfg.pattern, "removed": list(REMOVED), "params": param_counts(base.cfg),
                    "vs_parent": score.compare(parent, base, eval_b), "eval": score.compare(base, base, eval_b)}}

    print("dependency matrices and residual statistics")
    M_parent = fusion.dependency_matrix(parent, score_b, progress=False)
    M_base = fusion.dependency_matrix(base, score_b, progress=False)
    fusion.plot_dependency(M_parent, results / "dependency_parent.png", pattern=parent.cfg.pattern,
                           title="trained parent: M[i, j]")
    fusion.plot_dependency(M_base, results / "dependency_base.png", pattern=base.cfg.pattern,
                           title=f"base (layers {', '.join(map(str, REMOVED))} removed): M[i, j]")
    nan_list = lambda a: [None if not np.isfinite(v) else float(v) for v in np.ravel(a)]  # noqa: E731
    out["dependency"] = {"parent": [nan_list(r) for r in M_parent], "base": [nan_list(r) for r in M_base]}
    out["residual_stats"] = {k: nan_list(v) for k, v in fusion.residual_stats(base, score_b).items()}
    out["plan"] = {str(t): fusion.ffn_runs(base.cfg, M_base, threshold=t)
                   for t in sorted({float(np.nanmax(M_base[np.ix_(ffn, ffn)])), 0.1, 0.3})}

    print("children of the base")
    importance = ffn_importance(base, ffn, score_b)
    out["ffn_importance"] = {str(i): v for i, v in importance.items()}
    children = base_children(base, importance)
    rows = {}
    for name, child in children.items():
        rows[name] = {"pattern": child.cfg.pattern, "params": param_counts(child.cfg),
                      "before": score.compare(base, child, eval_b)}
        if not name.startswith("reversed"):  # the order control is compared with fusion as it is
            d = runs / "distill" / name.replace(" ", "_")
            distill(base, child, d, steps=distill_steps, train_config=tc, **kw)
            rows[name]["after"] = score.compare(base, load_run(d)[1], eval_b)
        print(f"  {name:16s} {child.cfg.pattern} KL {rows[name]['before']['kl']:.4f} acc "
              f"{rows[name]['before']['accuracy']:.4f}" + (f" -> {rows[name]['after']['accuracy']:.4f}"
                                                           if "after" in rows[name] else ""))
    out["children"] = rows
    jax.clear_caches()

    print("full-block parallelisation of the parent")
    out["blocks"] = window_rows(parent, M_parent, eval_b, out["parent"]["eval"]["accuracy"])

    print("latency")
    latency(out, {"parent": parent, "base": base, **children, **block_children(parent, out["blocks"])}, tc)
    out["meta"] = {"date": datetime.date.today().isoformat(), "jax": jax.__version__, "machine": platform.machine(),
                   "device": jax.devices()[0].device_kind, "base_steps": base_steps, "distill_steps": distill_steps,
                   "distill_lr": lr, "distill_batch": batch, "seq_len": tc.seq_len,
                   "score_batches": SCORE_BATCHES, "eval_batches": EVAL_BATCHES}
    return out


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.5))
    ax, bx = fig.subplots(1, 2)
    lat, base_acc = result["latency"], result["base"]["eval"]["accuracy"]
    for name, row in result["children"].items():
        x = lat[name]["decode"] / lat["base"]["decode"]
        ax.scatter(x, row["before"]["accuracy"] / base_acc, marker="o", color="C0" if "fuse" in name else "C3")
        if "after" in row:
            ax.scatter(x, row["after"]["accuracy"] / base_acc, marker="^", color="C0" if "fuse" in name else "C3")
            ax.plot([x, x], [row["before"]["accuracy"] / base_acc, row["after"]["accuracy"] / base_acc],
                    color="grey", lw=0.6)
        ax.annotate(name, (x, row["before"]["accuracy"] / base_acc), fontsize=7, xytext=(3, -8),
                    textcoords="offset points")
    ax.set_xlabel("decode latency / base's (measured, batch 8)")
    ax.set_ylabel("accuracy / base's")
    ax.set_title("fusion (blue) and FFN removal (red): o before, ^ after distillation")
    parent_acc = result["parent"]["eval"]["accuracy"]
    for size, rows in result["blocks"].items():
        bx.plot(range(1, len(rows) + 1), [r["before"]["accuracy"] / parent_acc for r in rows], marker="o",
                label=f"windows of {size}")
    bx.axhline(COLLAPSE, color="grey", ls="--", lw=0.8)
    bx.set_xlabel("parallelised windows (greedy order)")
    bx.set_ylabel("accuracy / parent's")
    bx.set_title("full-block parallelisation of the parent")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", type=Path, default=HERE.parent / "puzzle" / "runs" / "parent")
    p.add_argument("--runs", type=Path, default=HERE / "runs")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--base-steps", type=int, default=300, help="distillation steps of the base")
    p.add_argument("--distill-steps", type=int, default=100, help="distillation steps of every child")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8, help="distillation batch size")
    p.add_argument("--latency-only", action="store_true",
                   help="re-measure the latencies of a finished study's models (e.g. on a quieter machine), "
                        "keeping its quality results")
    args = p.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.latency_only:
        result = json.loads((args.results / "study.json").read_text())
        tc, parent, _ = load_run(args.parent)
        base = load_run(args.runs / "base")[1]
        models = {"parent": parent, "base": base, **base_children(base, result["ffn_importance"]),
                  **block_children(parent, result["blocks"])}
        latency(result, models, tc)
    else:
        result = run(args.parent, args.runs, args.results, base_steps=args.base_steps,
                     distill_steps=args.distill_steps, lr=args.lr, batch=args.batch)
    (args.results / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.results / "study.png")
    print(f"wrote {args.results / 'study.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
