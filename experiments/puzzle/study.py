"""The Puzzle study (issue 13): compress the trained parent at several budgets and compare, on held-out
files, the MIP's child with the simple baselines at the same budget, before and after distillation.

    python experiments/puzzle/study.py     # every stage; a re-run resumes BLD and distillation

Stages run through `nemojax.compress.puzzle.pipeline` on experiments/puzzle/runs/puzzle (git-ignored):
library (all kinds), BLD, replace-one scores on held-out batches 0-3 with costs measured here at batch
sizes 1 and 8, then per budget the MIP child (KL scores), the MIP child on LM-loss scores, and the
baselines (greedy, max parameters, no-op-only, uniform width, best of 20 random feasible children by
held-out KL). Every child is evaluated against the parent on held-out batches 4-11 (not those the
scores used), its whole-model decode and prefill latency measured here in one process interleaved
with the parent's. Distillation (cosine on every layer + KL, `--distill-steps` steps on the parent's
training data) runs for every child at the budgets of DISTILL_ALL and for the MIP child at the others,
and with the LM loss added for the MIP child at DISTILL_ALL; there the MIP child and the two best
baselines are distilled again with `--seeds` - 1 further data orders, so that the goal's comparison
carries its seed spread. Latency budgets bound the per-layer times measured here, except
"roofline50", which bounds the analytic H100 decode time (bytes and FLOPs at the roofline): there
narrowing a layer saves time in proportion, where on this CPU a layer's fixed dispatch cost makes
removing it the only large saving. Uniform width has no child at a budget where no single fraction
fits (the JSON names those). Writes results/study.json and results/study.png.

    python experiments/puzzle/study.py --latency-only   # re-time the children in results/study.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax

from nemojax.compress import puzzle
from nemojax.compress.puzzle import baselines, library, pipeline, score
from nemojax.compress.puzzle.assemble import assemble_from_dirs
from nemojax.compress.puzzle.distill import distill
from nemojax.nn.model import param_counts
from nemojax.train.loop import load_run, make_dataset

HERE = Path(__file__).parent
# name: (budget, what a latency budget bounds: the times measured here, or the H100 roofline estimate)
BUDGETS = {"decode75": ({"decode_latency": 0.75}, "measured"), "decode50": ({"decode_latency": 0.5}, "measured"),
           "decode35": ({"decode_latency": 0.35}, "measured"), "memory50": ({"memory": 0.5}, "measured"),
           "roofline50": ({"decode_latency": 0.5}, "roofline")}
DISTILL_ALL = ("decode50", "decode35", "roofline50")  # the budgets at which every child is distilled
BATCH_SIZES = (1, 8)
SCORE_BATCHES, EVAL_BATCHES = 4, 8
RANDOM_CHILDREN = 20
LATENCY_ROUNDS = 5
# decode steps per timed generation: a step's time is (generate(1 + new) - generate(1)) / new, so the
# steps must outweigh the prefill's run-to-run noise (at 32 some children's rounds came out at or below 0)
LATENCY_NEW = 128
# the goal's baselines; "mip_lm_scores" is the MIP on another objective (the KL-vs-LM comparison), not a baseline
BASELINES = (*pipeline.BASELINES, "random_best")


def eval_batches(tc, n: int) -> list[dict]:
    """Held-out batches SCORE_BATCHES .. SCORE_BATCHES + n - 1: none of them chose the architecture."""
    ds = make_dataset(tc, "validation")
    return [ds.batch(SCORE_BATCHES + i) for i in range(n)]


def choices(options, budget: dict, parent, candidates, bld_dir, tokens, batches) -> tuple[dict, dict, int]:
    """Per method, the option keys it picks at `budget` (random: the best of RANDOM_CHILDREN by KL), and
    per baseline that has no child at this budget, why."""
    mip = puzzle.search(options, budget, objective="kl", batch_sizes=BATCH_SIZES)[0]
    batch = mip["batch_size"]
    out = {"mip": mip["keys"],
           "mip_lm_scores": puzzle.search(options, budget, objective="lm_loss", batch_sizes=(batch,))[0]["keys"]}
    infeasible = {}
    for name, found in pipeline.baseline_choices(options, budget, parent.cfg, batch=batch).items():
        if "infeasible" in found:
            print(f"  {name}: {found['infeasible']}")
            infeasible[name] = found["infeasible"]
        else:
            out[name] = found["keys"]
    best = None
    for r in baselines.random_feasible(options, budget, RANDOM_CHILDREN, seed=0, batch=batch):
        child, _ = assemble_from_dirs(parent, r["keys"], candidates, bld_dir, tokens=tokens)
        kl = score.compare(parent, child, batches[:2])["kl"]
        if best is None or kl < best[0]:
            best = (kl, r["keys"])
    if best is not None:
        out["random_best"] = best[1]
    return out, infeasible, batch


def distilled(directory: Path, child, batches, parent, name: str, *, lm: bool, seed: int, steps: int, lr: float,
              batch_size: int) -> dict:
    """Held-out comparison with the parent after distilling `child` (resumes a stopped distillation)."""
    out_dir = directory / "distill" / f"{name}{'-lm' if lm else ''}-{steps}steps-seed{seed}"
    print(f"  distill {out_dir.name}")
    summary = distill(pipeline.DIRECTORY.parent(directory), child, out_dir, steps=steps, lr=lr, lm=lm, quiet=True,
                      batch_size=batch_size, seed=seed)
    if summary.get("interrupted"):  # a signal stopped it: stop the study too, or it would score a half-distilled child
        raise KeyboardInterrupt(f"distillation stopped and saved in {out_dir}; run the study again to resume")
    return score.compare(parent, load_run(out_dir)[1], batches)


def run(directory: Path, parent_run: Path, *, bld_tokens: int, distill_steps: int, distill_lr: float,
        distill_batch: int, seeds: int) -> dict:
    if not (directory / "library" / "library.json").exists():
        pipeline.run_library(directory, parent_run, calibration_batches=4)
    pipeline.run_bld(directory, tokens=bld_tokens, lr=1e-3)
    if not (directory / "scores" / "scores.json").exists():
        pipeline.run_score(directory, eval_batches=SCORE_BATCHES, batch_sizes=BATCH_SIZES, dtype="float32")
    tc, parent, candidates, tokens = load_inputs(directory)
    options = {mode: pipeline.options_table(directory, latency=mode) for mode in ("measured", "roofline")}
    batches = eval_batches(tc, EVAL_BATCHES)
    bld_dir = directory / "bld"
    train = dict(steps=distill_steps, lr=distill_lr, batch_size=distill_batch)

    out = {"parent": {"eval": score.compare(parent, parent, batches), "params": param_counts(parent.cfg)},
           "budgets": {}}
    for bname, (budget, latency) in BUDGETS.items():
        print(f"budget {bname} {budget} ({latency} latency)")
        opts = options[latency]
        try:
            picked, infeasible, batch = choices(opts, budget, parent, candidates, bld_dir, tokens, batches)
        except puzzle.Infeasible as err:
            print(f"  infeasible: {err}")
            out["budgets"][bname] = {"budget": budget, "latency": latency, "infeasible": str(err)}
            continue
        rows, children = {}, {}
        for method, keys in picked.items():
            children[method] = child = assemble_from_dirs(parent, keys, candidates, bld_dir, tokens=tokens)[0]
            choice = [opts.keys[i].index(k) for i, k in enumerate(keys)]
            row = {"keys": keys, "params": param_counts(child.cfg),
                   "predicted": {n: opts.total(n, choice) for n in ("kl", "lm_loss")},
                   "relative_cost": {c: opts.total(c, choice) / opts.total(c, opts.parent_choice())
                                     for c in opts.costs if opts.total(c, opts.parent_choice())},
                   "before": score.compare(parent, child, batches)}
            if bname in DISTILL_ALL or method == "mip":
                row["after"] = distilled(directory, child, batches, parent, f"{bname}-{method}", lm=False, seed=0,
                                         **train)
            if bname in DISTILL_ALL and method == "mip":
                row["after_lm"] = distilled(directory, child, batches, parent, f"{bname}-{method}", lm=True, seed=0,
                                            **train)
            rows[method] = row
            print(f"  {method:14s} KL {row['before']['kl']:.4f} acc {row['before']['accuracy']:.4f}"
                  + (f" -> after KL {row['after']['kl']:.4f} acc {row['after']['accuracy']:.4f}" if "after" in row else ""))
        if bname in DISTILL_ALL and seeds > 1:
            # the goal's comparison, repeated where it is closest: the MIP and the two best baselines
            ranked = sorted((m for m in rows if m in BASELINES), key=lambda m: -rows[m]["after"]["accuracy"])
            for method in ["mip", *ranked[:2]]:
                rows[method]["after_seeds"] = [rows[method]["after"]] + [
                    distilled(directory, children[method], batches, parent, f"{bname}-{method}", lm=False,
                              seed=seed, **train) for seed in range(1, seeds)]
        out["budgets"][bname] = {"budget": budget, "latency": latency, "batch_size": batch, "children": rows,
                                 "infeasible": infeasible}
        # every child is a new program: free the compiled ones, or a process compiling hundreds runs out of
        # memory mappings (LLVM: "Cannot allocate memory" with most of the RAM free)
        jax.clear_caches()

    measure_latency(out, directory)
    return out


def load_inputs(directory: Path):
    """(training config, parent, library candidates, calibration tokens) of the study's directory."""
    tc, parent = pipeline.load_parent(directory)
    candidates, meta = library.load_library(directory / "library" / "library.json", parent)
    return tc, parent, candidates, pipeline.calibration_tokens(tc, meta["calibration_batches"])


def measure_latency(out: dict, directory: Path) -> None:
    """Whole-model latency of the parent and every child in `out`, measured together, into `out`."""
    tc, parent, candidates, tokens = load_inputs(directory)
    models = {"parent": parent}
    for bname, b in out["budgets"].items():
        for method, row in b.get("children", {}).items():
            models[f"{bname}/{method}"] = assemble_from_dirs(parent, row["keys"], candidates, directory / "bld",
                                                             tokens=tokens)[0]
    setting = {"batch": 8, "prompt": tc.seq_len, "new_tokens": LATENCY_NEW, "rounds": LATENCY_ROUNDS}
    lat = score.model_latency(models, batch=setting["batch"], prompt=setting["prompt"], new=LATENCY_NEW,
                              rounds=LATENCY_ROUNDS)
    out["parent"]["latency"] = lat["parent"]
    for name, t in lat.items():
        if name != "parent":
            bname, method = name.split("/")
            row = out["budgets"][bname]["children"][method]
            row["latency"] = t
            row["speedup"] = {p: lat["parent"][p] / t[p] for p in ("prefill", "decode")}
    out["latency_setting"] = setting


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 4.5))
    axes = fig.subplots(1, 3)
    parent_acc = result["parent"]["eval"]["accuracy"]
    markers = {"mip": "o", "mip_lm_scores": "s", "greedy": "^", "max_params": "v", "noop_only": "D",
               "uniform": "P", "random_best": "x"}
    panels = [("measured", "before", "decode latency / parent's (measured here, batch 8)"),
              ("measured", "after", "decode latency / parent's (measured here, batch 8)"),
              ("roofline", "after", "decode latency / parent's (H100 roofline, the budget's batch)")]
    for ax, (latency, stage, xlabel) in zip(axes, panels):
        for bname, b in result["budgets"].items():
            if b.get("latency") != latency:
                continue
            for method, row in b.get("children", {}).items():
                if stage in row:
                    x = (1 / row["speedup"]["decode"] if latency == "measured"
                         else row["relative_cost"][f"decode_latency@{b['batch_size']}"])
                    ax.scatter(x, row[stage]["accuracy"] / parent_acc, marker=markers.get(method, "."),
                               color=f"C{list(markers).index(method) if method in markers else 9}",
                               label=method, alpha=0.8)
        ax.axhline(0.97, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("next-token accuracy / parent's")
        ax.set_title(f"{latency} latency budgets: children {stage} distillation")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", type=Path, default=HERE / "runs" / "parent")
    p.add_argument("--dir", type=Path, default=HERE / "runs" / "puzzle")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--bld-tokens", type=int, default=32768, help="tokens per candidate")
    p.add_argument("--distill-steps", type=int, default=80)
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--distill-batch", type=int, default=8, help="sequences per distillation step")
    p.add_argument("--seeds", type=int, default=3,
                   help="distillation seeds (data order) for the MIP child and the two best baselines at the "
                        "budgets where every child is distilled")
    p.add_argument("--latency-only", action="store_true",
                   help="re-measure only the whole-model latencies of the children in results/study.json")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds: at least 1 (the first distillation is seed 0), got {args.seeds}")
    if args.latency_only:
        unused = [f"--{name.replace('_', '-')}" for name in ("parent", "bld_tokens", "distill_steps", "distill_lr",
                                                               "distill_batch", "seeds")
                  if getattr(args, name) != p.get_default(name)]
        if unused:
            p.error(f"--latency-only re-times the children in study.json and uses only --dir and --results; "
                    f"drop {', '.join(unused)}")
        path = args.results / "study.json"
        if not path.exists():
            p.error(f"--latency-only: {path} does not exist; run the study first")
        result = json.loads(path.read_text())
        measure_latency(result, args.dir)
        result["meta"]["latency_date"] = datetime.date.today().isoformat()
        path.write_text(json.dumps(result, indent=2, default=float) + "\n")
        plot(result, args.results / "study.png")
        return 0
    t0 = time.perf_counter()
    result = run(args.dir, args.parent, bld_tokens=args.bld_tokens, distill_steps=args.distill_steps,
                 distill_lr=args.distill_lr, distill_batch=args.distill_batch, seeds=args.seeds)
    result["meta"] = {"date": datetime.date.today().isoformat(), "jax": jax.__version__, "cpus": os.cpu_count(),
                      "machine": platform.processor() or platform.machine(), "bld_tokens": args.bld_tokens,
                      "distill_steps": args.distill_steps, "distill_lr": args.distill_lr,
                      "distill_batch": args.distill_batch, "distill_seeds": args.seeds,
                      "score_batches": SCORE_BATCHES, "eval_batches": EVAL_BATCHES,
                      "seconds": time.perf_counter() - t0}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "study.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    plot(result, args.results / "study.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
