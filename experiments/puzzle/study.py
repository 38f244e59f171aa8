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
"roofline50", which bounds the analytic H100 decode time (bytes and FLOPs at the roofline). On this
CPU the layers' times, each timed alone, do not add up to the whole model's (the JSON has both for
every child: relative_cost and speedup), so at the measured decode latency budgets every method is
calibrated: the budget it searches under is scaled until its child's whole-model decode latency,
measured against the parent's, is at most the budget (`Study.calibrated`), so that all children are
compared at the same measured latency. Uniform width has no child at a budget
where no single fraction fits (the JSON names those). Writes results/study.json and results/study.png.

    python experiments/puzzle/study.py --latency-only   # re-time the children in results/study.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from nemojax.compress import puzzle
from nemojax.compress.puzzle import baselines, library, pipeline, score
from nemojax.compress.puzzle.assemble import assemble_from_dirs
from nemojax.compress.puzzle.distill import distill
from nemojax.nn.model import param_counts
from nemojax.train.loop import load_run

HERE = Path(__file__).parent
# name: (budget, what a latency budget bounds: the times measured here, or the H100 roofline estimate)
BUDGETS = {"decode75": ({"decode_latency": 0.75}, "measured"), "decode50": ({"decode_latency": 0.5}, "measured"),
           "decode35": ({"decode_latency": 0.35}, "measured"), "memory50": ({"memory": 0.5}, "measured"),
           "roofline50": ({"decode_latency": 0.5}, "roofline")}
DISTILL_ALL = ("decode50", "decode35", "roofline50")  # the budgets at which every child is distilled
BATCH_SIZES = (1, 8)  # the score stage's batch sizes; the MIP re-solves over them where not calibrated
SCORE_BATCHES, EVAL_BATCHES = 4, 8
RANDOM_CHILDREN = 20
# Whole-model timing (`score.model_latency`): `batch` held-out prompts of seq_len - new_tokens tokens, so
# that decoding fills the cache to the seq_len at which the score stage timed each layer; each decode step
# is (generate(1 + new) - generate(1)) / new, so the steps must outweigh the prefill's run-to-run noise
# (at 32 some children's rounds came out at or below 0). "rounds" for the report, "calibration_rounds"
# for each child the calibration tries.
LATENCY = {"batch": 8, "new_tokens": 128, "rounds": 5, "calibration_rounds": 3}
# Calibration of the measured budgets: bisection steps on the scale of the per-layer budget
CALIBRATION_STEPS = 5
METHODS = ("mip", "mip_lm_scores", *pipeline.BASELINES, "random_best")
# the goal's baselines; "mip_lm_scores" is the MIP on another objective (the KL-vs-LM comparison), not a baseline
BASELINES = (*pipeline.BASELINES, "random_best")


def eval_batches(tc, n: int) -> list[dict]:
    """Held-out batches SCORE_BATCHES .. SCORE_BATCHES + n - 1: none of them chose the architecture."""
    return pipeline.heldout_batches(tc, n, first=SCORE_BATCHES)


class Study:
    """What picking and timing children needs: the parent, its library and BLD weights, the held-out
    batches and the latency prompts; children are assembled, scored and timed once per option keys."""

    def __init__(self, directory: Path):
        self.tc, self.parent, self.candidates, self.tokens = load_inputs(directory)
        self.bld_dir = directory / "bld"
        self.batches = eval_batches(self.tc, EVAL_BATCHES)
        # the rows after the evaluation's; decoding fills the cache to the seq_len the score stage timed at
        self.prompts = pipeline.heldout_prompts(self.tc, LATENCY["batch"], self.tc.seq_len - LATENCY["new_tokens"],
                                                first=SCORE_BATCHES + EVAL_BATCHES)
        self._kl: dict[tuple, float] = {}
        self._measured: dict[tuple, float] = {}

    def child(self, keys):
        return assemble_from_dirs(self.parent, keys, self.candidates, self.bld_dir, tokens=self.tokens)[0]

    def kl(self, keys) -> float:
        """Held-out KL to the parent on two evaluation batches (how the best random child is chosen)."""
        if tuple(keys) not in self._kl:
            self._kl[tuple(keys)] = score.compare(self.parent, self.child(keys), self.batches[:2])["kl"]
        return self._kl[tuple(keys)]

    def measured(self, keys) -> float:
        """The child's whole-model decode latency / the parent's, timed together (calibration rounds)."""
        if tuple(keys) not in self._measured:
            lat = score.model_latency({"parent": self.parent, "child": self.child(keys)}, self.prompts,
                                      new=LATENCY["new_tokens"], rounds=LATENCY["calibration_rounds"])
            self._measured[tuple(keys)] = lat["child"]["decode"] / lat["parent"]["decode"]
        return self._measured[tuple(keys)]

    def pick(self, method: str, options, budget: dict, batch: int) -> list[str]:
        """`method`'s option keys at `budget`, searched at `batch`; puzzle.Infeasible if it has no child
        there (random: the best of RANDOM_CHILDREN feasible children by KL)."""
        if method in ("mip", "mip_lm_scores"):
            objective = "kl" if method == "mip" else "lm_loss"
            return puzzle.search(options, budget, objective=objective, batch_sizes=(batch,))[0]["keys"]
        if method == "random_best":
            found = baselines.random_feasible(options, budget, RANDOM_CHILDREN, seed=0, batch=batch)
            if not found:
                raise puzzle.Infeasible(f"no random child fits {budget}")
            return min((r["keys"] for r in found), key=self.kl)
        found = pipeline.baseline_choices(options, budget, self.parent.cfg, batch=batch)[method]
        if "infeasible" in found:
            raise puzzle.Infeasible(found["infeasible"])
        return found["keys"]

    def calibrated(self, method: str, options, budget: dict) -> dict:
        """`method`'s child under the decode latency budget as measured on the whole model: the per-layer
        times, each layer timed alone, do not add up to the model's on this CPU (README), so the budget
        the method searches under is scaled, by bisection on log(scale) over CALIBRATION_STEPS timed
        children, to the largest scale whose child's measured decode latency / the parent's is at most
        the budget. {"keys", "scale", "measured", "trials": [{"scale", "measured"}]} (measured None where
        the method had no child at that scale); puzzle.Infeasible if no scale tried gave a fitting child."""
        target = budget["decode_latency"]
        lo, hi, scale = 0.0, 1.0 / target, 1.0  # at 1 / target the budget admits the parent, which never fits
        best, trials = None, []
        for _ in range(CALIBRATION_STEPS):
            try:
                keys = self.pick(method, options, {**budget, "decode_latency": target * scale}, LATENCY["batch"])
                measured = self.measured(keys)
            except puzzle.Infeasible:
                keys, measured = None, None
            trials.append({"scale": scale, "measured": measured})
            if measured is None or measured <= target:
                lo = scale
                if measured is not None:
                    best = {"keys": keys, "scale": scale, "measured": measured}
            else:
                hi = scale
            scale = float(np.sqrt(lo * hi)) if lo else scale / 2
        if best is None:
            raise puzzle.Infeasible(f"{method}: no child measured within decode_latency {target} at the scales "
                                    f"{[round(t['scale'], 3) for t in trials]}")
        return best | {"trials": trials}

    def choices(self, options, budget: dict, latency: str) -> tuple[dict, dict, int, dict]:
        """Per method, the option keys it picks at `budget`; per method that has no child there, why; the
        batch size searched at; per method, its calibration (measured latency budgets only). On the
        measured budgets every method is calibrated at the timing's batch; elsewhere the MIP re-solves
        over BATCH_SIZES and the others search at its batch size."""
        picked, infeasible, calibration = {}, {}, {}
        if latency == "measured" and "decode_latency" in budget:
            batch = LATENCY["batch"]
            for method in METHODS:
                try:
                    calibration[method] = self.calibrated(method, options, budget)
                    picked[method] = calibration[method].pop("keys")
                except puzzle.Infeasible as err:
                    infeasible[method] = str(err)
                jax.clear_caches()  # a calibration compiles dozens of children: see run()
        else:
            batch = puzzle.search(options, budget, objective="kl", batch_sizes=BATCH_SIZES)[0]["batch_size"]
            for method in METHODS:
                try:
                    picked[method] = self.pick(method, options, budget, batch)
                except puzzle.Infeasible as err:
                    infeasible[method] = str(err)
        if "mip" not in picked:
            raise puzzle.Infeasible(infeasible["mip"])
        for method, why in infeasible.items():
            print(f"  {method}: {why}")
        return picked, infeasible, batch, calibration


def distilled(directory: Path, child, keys, batches, parent, name: str, *, lm: bool, seed: int, steps: int,
              lr: float, batch_size: int) -> dict:
    """Held-out comparison with the parent after distilling `child` (resumes a stopped distillation; the
    run's directory names the child's option keys by a digest, so that another child never resumes it)."""
    digest = hashlib.sha1(",".join(keys).encode()).hexdigest()[:8]
    out_dir = directory / "distill" / f"{name}-{digest}{'-lm' if lm else ''}-{steps}steps-seed{seed}"
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
    study = Study(directory)
    parent, batches = study.parent, study.batches
    options = {mode: pipeline.options_table(directory, latency=mode) for mode in ("measured", "roofline")}
    train = dict(steps=distill_steps, lr=distill_lr, batch_size=distill_batch)

    out = {"parent": {"eval": score.compare(parent, parent, batches), "params": param_counts(parent.cfg)},
           "budgets": {}}
    for bname, (budget, latency) in BUDGETS.items():
        print(f"budget {bname} {budget} ({latency} latency)")
        opts = options[latency]
        try:
            picked, infeasible, batch, calibration = study.choices(opts, budget, latency)
        except puzzle.Infeasible as err:
            print(f"  infeasible: {err}")
            out["budgets"][bname] = {"budget": budget, "latency": latency, "infeasible": str(err)}
            continue
        rows, children = {}, {}
        for method, keys in picked.items():
            children[method] = child = study.child(keys)
            choice = [opts.keys[i].index(k) for i, k in enumerate(keys)]
            row = {"keys": keys, "params": param_counts(child.cfg),
                   "predicted": {n: opts.total(n, choice) for n in ("kl", "lm_loss")},
                   "relative_cost": {c: opts.total(c, choice) / opts.total(c, opts.parent_choice())
                                     for c in opts.costs if opts.total(c, opts.parent_choice())},
                   "before": score.compare(parent, child, batches)}
            if method in calibration:
                row["calibration"] = calibration[method]
            if bname in DISTILL_ALL or method == "mip":
                row["after"] = distilled(directory, child, keys, batches, parent, f"{bname}-{method}", lm=False,
                                         seed=0, **train)
            if bname in DISTILL_ALL and method == "mip":
                row["after_lm"] = distilled(directory, child, keys, batches, parent, f"{bname}-{method}", lm=True,
                                            seed=0, **train)
            rows[method] = row
            print(f"  {method:14s} KL {row['before']['kl']:.4f} acc {row['before']['accuracy']:.4f}"
                  + (f" -> after KL {row['after']['kl']:.4f} acc {row['after']['accuracy']:.4f}" if "after" in row else ""))
        if bname in DISTILL_ALL and seeds > 1:
            # the goal's comparison, repeated where it is closest: the MIP and the two best baselines
            ranked = sorted((m for m in rows if m in BASELINES), key=lambda m: -rows[m]["after"]["accuracy"])
            for method in ["mip", *ranked[:2]]:
                rows[method]["after_seeds"] = [rows[method]["after"]] + [
                    distilled(directory, children[method], rows[method]["keys"], batches, parent, f"{bname}-{method}",
                              lm=False, seed=seed, **train) for seed in range(1, seeds)]
        out["budgets"][bname] = {"budget": budget, "latency": latency, "batch_size": batch, "children": rows,
                                 "infeasible": infeasible}
        # every child is a new program: free the compiled ones, or a process compiling hundreds runs out of
        # memory mappings (LLVM: "Cannot allocate memory" with most of the RAM free)
        jax.clear_caches()

    measure_latency(out, study)
    return out


def load_inputs(directory: Path):
    """(training config, parent, library candidates, calibration tokens) of the study's directory."""
    tc, parent = pipeline.load_parent(directory)
    candidates, meta = library.load_library(directory / "library" / "library.json", parent)
    return tc, parent, candidates, pipeline.calibration_tokens(tc, meta["calibration_batches"])


def measure_latency(out: dict, study: Study) -> None:
    """Whole-model latency of every child in `out`, each timed in turns with the parent (as the
    calibration times them, over LATENCY["rounds"] rounds), into `out`: the child's ("latency"), the
    parent's in the same rounds ("parent_latency") and their ratio ("speedup")."""
    out["parent"].pop("latency", None)  # a study timed before children were timed in pairs has one
    for b in out["budgets"].values():
        for row in b.get("children", {}).values():
            lat = score.model_latency({"parent": study.parent, "child": study.child(row["keys"])}, study.prompts,
                                      new=LATENCY["new_tokens"], rounds=LATENCY["rounds"])
            row["latency"], row["parent_latency"] = lat["child"], lat["parent"]
            row["speedup"] = {p: lat["parent"][p] / lat["child"][p] for p in ("prefill", "decode")}
    out["latency_setting"] = {**LATENCY, "prompt": int(study.prompts.shape[1]),
                              "calibration_steps": CALIBRATION_STEPS}


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 4.5))
    axes = fig.subplots(1, 3)
    parent_acc = result["parent"]["eval"]["accuracy"]
    markers = {"mip": "o", "mip_lm_scores": "s", "greedy": "^", "max_params": "v", "noop_only": "D",
               "uniform": "P", "random_best": "x"}
    measured = f"decode latency / parent's (measured here, batch {LATENCY['batch']})"
    titles = {"measured": "budgets on this CPU's costs", "roofline": "budget on the H100 roofline"}
    panels = [("measured", "before", measured), ("measured", "after", measured),
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
        ax.set_title(f"{titles[latency]}: children {stage} distillation")
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
        measure_latency(result, Study(args.dir))
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
