"""Theory meets practice (issue 14): predict, without training anything, the damage of every one-step
surgery on the trained Puzzle parent, and hold the predictions against the measured damage.

Candidates: for every layer j, remove it (a no-op) or linearise it (the least-squares affine stand-in of
the Puzzle library, `library.fit_linear`, on the calibration tokens, for every layer kind); for every
adjacent pair, fuse it (`fusion.parallelize(parent, j, j + 2)`: both layers read layer j's input, each
with its own pre-norm). Measured: KL(parent || child) of the next-token distributions on held-out
batches (`score.compare`). Every predictor is computed on training-split (calibration) tokens only:

  alpha_law       ntk.alpha_law with alpha_j = |h_j| / |x| (fusion.residual_stats "rel_norm"): alpha_j^2,
                  (1/2 - 1/pi) alpha_j^2, alpha_j^2 alpha_{j+1}^2 for remove, linear, fuse
  ntk_surgery     ntk.surgery_change: the residual NTK's output change Var(f_B - f_A) / Var f_A at
                  infinite width, the measured alphas, depth = number of layers (cross-kernels)
  ntk_kernel      ntk.kernel_change: sup_u |K_B(u) - K_A(u)| / K_A(1) of that residual NTK
  empirical_ntk   |Theta_B - Theta_A|_F / |Theta_A|_F, the trained model's empirical NTK (ntk.lm_empirical_ntk)
                  of a centred random projection of the logits, on --ntk-windows windows of --ntk-context bytes
  local_error     mean over tokens of |delta|/|x_j|: the change of the residual stream right after the
                  candidate's layers when they read the parent's stream x_j (remove: |h_j|/|x_j|)
  rel_norm        |h|/|x| of the layers the candidate changes (summed over a fused pair)
  cos_dist_x_fx   1 - cos(x, f(x)), summed likewise;  cos_h_x: |cos(h, x)|, summed likewise
  dependency      FFN Fusion's dependency M[j, j+1] (fuse only)

Spearman rank correlation (scipy.stats.spearmanr) of each predictor with the measured KL per operation
and over all candidates. Writes results/theory.json and results/theory.png.

    python experiments/fusion/theory.py [--parent RUN] [--heldout-batches 4] [--calibration-batches 2]
                                        [--ntk-windows 32] [--ntk-context 64]
    python experiments/fusion/theory.py --replot      # redraw the plot from results/theory.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx
from scipy.stats import spearmanr
from tqdm import tqdm

from nemojax import ntk
from nemojax.compress import fusion
from nemojax.compress.puzzle import score
from nemojax.compress.puzzle.library import fit_linear
from nemojax.compress.puzzle.pipeline import calibration_tokens, heldout_batches
from nemojax.config import NoOpSpec
from nemojax.train.loop import load_run

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

HERE = Path(__file__).parent
OPS = ("remove", "linear", "fuse")
PREDICTORS = {  # name: (label, the ops it predicts)
    "alpha_law": ("alpha-order law", OPS),
    "ntk_surgery": ("residual NTK, output change", OPS),
    "ntk_kernel": ("residual NTK, kernel change", OPS),
    "empirical_ntk": ("empirical NTK change", OPS),
    "local_error": ("local error |delta|/|x|", OPS),
    "rel_norm": ("|h|/|x|", OPS),
    "cos_dist_x_fx": ("1 - cos(x, f(x))", OPS),
    "cos_h_x": ("|cos(h, x)|", OPS),
    "dependency": ("dependency M[j, j+1]", ("fuse",)),
}
COLOURS = {"remove": "tab:red", "linear": "tab:blue", "fuse": "tab:green"}


def replacement(op: str, j: int) -> dict:
    """The candidate in the residual NTK's format (`ntk.resnet_ntk`)."""
    return {j: ("fuse", j + 1) if op == "fuse" else op}


def changed_layers(op: str, j: int) -> range:
    return range(j, j + 2 if op == "fuse" else j + 1)


def children(parent, states):
    """(key, op, j, child) for every candidate; `states` are the parent's streams on the calibration
    tokens, which the least-squares linear stand-ins are fitted to."""
    n = len(parent.layers)
    for j in range(n):
        yield f"{j}:remove", "remove", j, parent.replace_layers({j: (NoOpSpec(), None)})
        yield f"{j}:linear", "linear", j, parent.replace_layers({j: fit_linear(parent.layers[j], states[j])})
        if j + 1 < n:
            yield f"{j}:fuse", "fuse", j, fusion.parallelize(parent, j, j + 2)


@nnx.jit
def _apply(block, x):
    return block(x)[0]


@nnx.jit
def _layer_states(model, tokens):
    return model.layer_states(tokens)


def local_error(child, states, layers: range) -> float:
    """Mean over tokens of |x'_stop - x_stop| / |x_start|, x' the stream after the child's `layers` run on
    the parent's stream x_start (the candidate's perturbation where it is made)."""
    x = states[layers.start]
    y = x
    for k in layers:
        y = _apply(child.layers[k], y)
    delta = np.linalg.norm(np.asarray(y - states[layers.stop], np.float64), axis=-1)
    return float(np.mean(delta / np.maximum(np.linalg.norm(np.asarray(x, np.float64), axis=-1), 1e-4)))


def correlations(rows) -> dict:
    out = {}
    for name, (_, ops) in PREDICTORS.items():
        out[name] = {}
        for op in (*ops, "all") if len(ops) > 1 else ops:
            picked = [r for r in rows if op in ("all", r["op"])]
            rho, p = spearmanr([r["predicted"][name] for r in picked], [r["measured"]["kl"] for r in picked])
            out[name][op] = {"rho": float(rho), "p": float(p), "n": len(picked)}
    return out


def plot(result, path: Path) -> None:
    names = list(PREDICTORS)
    cols = 3
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.6 * 3), squeeze=False)
    for ax, name in zip(axes.flat, names):
        label, ops = PREDICTORS[name]
        for op in ops:
            rows = [r for r in result["candidates"] if r["op"] == op]
            ax.scatter([r["predicted"][name] for r in rows], [r["measured"]["kl"] for r in rows], s=22,
                       color=COLOURS[op], label=op)
            for r in rows:
                ax.annotate(str(r["layer"]), (r["predicted"][name], r["measured"]["kl"]), fontsize=6,
                            xytext=(2, 2), textcoords="offset points")
        s = result["spearman"][name]
        where = "all" if "all" in s else ops[0]
        ax.set(xscale="log", yscale="log", title=f"{label}\nrho ({where}) = {s[where]['rho']:.2f}",
               xlabel="predicted", ylabel="measured KL")
        for axis in (ax.xaxis, ax.yaxis):  # a log axis spanning under a decade labels its minor ticks, overlapping
            axis.set_minor_formatter(NullFormatter())
        ax.title.set_fontsize(9)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Predicted damage vs KL(parent || child), {result['meta']['pattern']} "
                 "(numbers: the candidate's first layer)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> dict:
    start = time.time()
    tc, parent, _ = load_run(args.parent)
    pattern = parent.cfg.pattern
    heldout = heldout_batches(tc, args.heldout_batches)
    cal = calibration_tokens(tc, args.calibration_batches)
    cal_batches = list(cal.reshape(args.calibration_batches, -1, cal.shape[1]))

    stats = fusion.residual_stats(parent, cal_batches)
    alpha = stats["rel_norm"]
    dep = fusion.dependency_matrix(parent, cal_batches, progress=False)
    states = [np.concatenate(s) for s in zip(*(jax.device_get(_layer_states(parent, b)) for b in cal_batches))]
    if args.ntk_context > cal.shape[1] or args.ntk_windows > cal.shape[0] * (cal.shape[1] // args.ntk_context):
        raise ValueError(f"--ntk-windows {args.ntk_windows} of --ntk-context {args.ntk_context} bytes do not fit in "
                         f"the calibration tokens {cal.shape}")
    windows = np.concatenate([cal[:, s:s + args.ntk_context]
                              for s in range(0, cal.shape[1] - args.ntk_context + 1, args.ntk_context)])
    windows = windows[:args.ntk_windows]
    r = np.random.default_rng(args.seed).standard_normal(parent.cfg.vocab_size)
    projection = (r - r.mean()) / np.sqrt(r.size)
    ntk_parent = ntk.lm_empirical_ntk(parent, windows, projection)

    rows = []
    n_candidates = 3 * len(parent.layers) - 1
    for key, op, j, child in tqdm(children(parent, states), total=n_candidates, desc="candidates"):
        layers = changed_layers(op, j)
        ntk_child = ntk.lm_empirical_ntk(child, windows, projection)
        with jax.enable_x64():
            a = np.asarray(alpha, np.float64)
            rep = replacement(op, j)
            theory = {"alpha_law": ntk.alpha_law(a, rep), "ntk_surgery": ntk.surgery_change(a, rep),
                      "ntk_kernel": ntk.kernel_change(depth=len(a), alpha=jnp.asarray(a), replace=rep)}
        predicted = theory | {
            "empirical_ntk": float(np.linalg.norm(ntk_child - ntk_parent) / np.linalg.norm(ntk_parent)),
            "local_error": local_error(child, states, layers),
            "rel_norm": float(sum(alpha[k] for k in layers)),
            "cos_dist_x_fx": float(sum(stats["cos_dist_x_fx"][k] for k in layers)),
            "cos_h_x": float(sum(abs(stats["cos_h_x"][k]) for k in layers)),
        }
        if op == "fuse":
            predicted["dependency"] = float(dep[j, j + 1])
        measured = score.compare(parent, child, heldout)
        rows.append({"key": key, "op": op, "layer": j, "kinds": "".join(pattern[k] for k in layers),
                     "measured": measured, "predicted": predicted})

    spearman = correlations(rows)
    best = {op: max((n for n in PREDICTORS if op in spearman[n]), key=lambda n: spearman[n][op]["rho"])
            for op in (*OPS, "all")}
    return {
        "meta": {"parent": str(args.parent), "pattern": pattern, "layers": len(parent.layers),
                 "heldout_batches": args.heldout_batches, "heldout_tokens": rows[0]["measured"]["tokens"],
                 "calibration_batches": args.calibration_batches, "calibration_tokens": int(cal.size),
                 "ntk_windows": int(len(windows)), "ntk_context": args.ntk_context, "seed": args.seed,
                 "seconds": time.time() - start, "date": datetime.date.today().isoformat(), "jax": jax.__version__,
                 "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                 "command": "python experiments/fusion/theory.py " + " ".join(sys.argv[1:])},
        "parent": score.compare(parent, parent, heldout),
        "layer_stats": {"alpha": alpha.tolist(), "cos_dist_x_fx": stats["cos_dist_x_fx"].tolist(),
                        "cos_h_x": stats["cos_h_x"].tolist()},
        "candidates": rows,
        "spearman": spearman,
        "best": best,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", type=Path, default=HERE.parent / "puzzle" / "runs" / "parent")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--heldout-batches", type=int, default=4, help="held-out batches the KL is measured on")
    p.add_argument("--calibration-batches", type=int, default=2,
                   help="training batches for the statistics, the linear fits and the eNTK windows")
    p.add_argument("--ntk-windows", type=int, default=32, help="outputs of the empirical NTK")
    p.add_argument("--ntk-context", type=int, default=64, help="bytes of context per empirical-NTK window")
    p.add_argument("--seed", type=int, default=0, help="of the logits' random projection")
    p.add_argument("--replot", action="store_true", help="only redraw theory.png from an existing theory.json")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads((args.results / "theory.json").read_text()), args.results / "theory.png")
        return 0
    for name in ("heldout_batches", "calibration_batches", "ntk_windows", "ntk_context"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    result = run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "theory.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.results / "theory.png")
    for name, s in result["spearman"].items():
        print(f"{name:>14}: " + ", ".join(f"{op} {v['rho']:+.2f} (p={v['p']:.2g})" for op, v in s.items()))
    print(f"best: {result['best']}; {result['meta']['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
