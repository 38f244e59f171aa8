"""Experiment 5: theory meets practice for block replacement in wide residual MLPs.

Network (nemojax.ntk.resmlp; NTK parameterisation, every weight standard normal and trained):
x_0 = A x, x_l = x_{l-1} + alpha_l sqrt(2/m) V_l relu(W_l x_{l-1}/sqrt(m)), f = v^T x_L/sqrt(m), with a
fixed uneven profile alpha_l = alpha * s_l (mean s_l^2 = 1) so that blocks differ. Inputs on S^2, target
a sum of spherical harmonics of degrees `--degrees` with random axes, full-batch GD on (1/2n)|f - y|^2
with lr = 1/lambda_max of the analytic NTK / n. "centred" settings train f(x; theta) - f(x; theta_0)
(the kernel-regime picture without the random initial function); "raw f" trains f itself.
Settings, from lazy towards feature learning: alpha = L^-1/2 at width 256 (the reference), alpha = 1,
width 64, alpha = 2 at width 64 trained 3x longer, Adam instead of GD, and raw f.

For every block i and op in {remove, linear, fuse with i+1}:
  predicted  kernel      sup_u |K'(u) - K(u)| / K(1)                (ntk.replacement_effects)
             spectral    sum_k E_k [(1 - lr mu'_k)^2T - (1 - lr mu_k)^2T], E_k the target's energy at
                         degree k: the population residual change after T steps (Funk-Hecke mu_k)
             lazy        test-MSE change predicted in the kernel regime on the actual data
                         (ntk.lazy_gd_prediction): for surgery from the cross-kernels between the
                         trained network and its modified copy (ntk.resnet_cross_kernels), for
                         retraining from the modified architecture's own kernels
  measured   surgery     test-MSE change after applying the op to the trained weights: remove = skip,
                         fuse = block i+1 reads x_{i-1}, linear = relu -> a_j h + b_j |x|/sqrt(m) per
                         unit, least squares on the training pre-activations ("linear_hermite": the
                         theory's a = 1/2, b = 1/sqrt(2 pi) instead)
             retrain     test-MSE change of the modified architecture trained from the same
                         initial weights (common random numbers), mean over seeds
Spearman rank correlations between predicted and measured changes, per op and over all candidates.

    python experiments/ntk/block_replacement.py [--depth 6] [--width 256] [--seeds 2] [--steps 200] [--only 0 1]
Writes experiments/ntk/results/block_replacement.{json,png} and block_replacement_blocks.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nemojax import ntk  # noqa: E402

OUT = Path(__file__).parent / "results"
OPS = ("remove", "linear", "fuse")


def sphere(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def harmonic_target(rng, degrees, d):
    """y(x) = sum_k sqrt(N(d, k)) P_k(<x, u_k>) / sqrt(#degrees): unit variance per degree."""
    axes = sphere(rng, len(degrees), d)

    def y(X):
        out = 0.0
        for k, u in zip(degrees, axes):
            out = out + math.sqrt(ntk.multiplicity(d, k)) * ntk.gegenbauer(k, d, X @ u)[k]
        return out / math.sqrt(len(degrees))
    return y


def stack(specs):
    return jax.tree.map(lambda *a: jnp.stack(a), *specs)


def make_trainer(X, y, steps, centred, opt):
    """Full-batch training (optax `opt`) of every candidate architecture, vmapped over the spec arrays,
    all from the same initial weights; returns the trained parameters stacked over candidates."""

    @jax.jit
    def train(params0, specs, alphas):
        def one(spec):
            f0 = ntk.resmlp_apply(params0, X, alpha=alphas, spec=spec) * centred

            def loss(p):
                return 0.5 * jnp.mean((ntk.resmlp_apply(p, X, alpha=alphas, spec=spec) - f0 - y) ** 2)

            def body(carry, _):
                p, state = carry
                updates, state = opt.update(jax.grad(loss)(p), state, p)
                return (optax.apply_updates(p, updates), state), None
            return jax.lax.scan(body, (params0, opt.init(params0)), None, length=steps)[0][0]
        return jax.vmap(one)(specs)
    return train


@jax.jit
def test_mse(params, params0, specs, alphas, X, y, centred):
    """Test MSE of (stacked or shared) parameters under each spec; centred subtracts f(theta_0)."""
    def one(p, spec):
        f = ntk.resmlp_apply(p, X, alpha=alphas, spec=spec) - centred * ntk.resmlp_apply(params0, X, alpha=alphas,
                                                                                         spec=spec)
        return jnp.mean((f - y) ** 2)
    return jax.vmap(one)(params, specs)


def least_squares_standin(params, X, alphas):
    """Per block and unit, relu(h) ~ a h + b r on the training inputs (r = |x_{l-1}|/sqrt(m))."""
    _, pre = ntk.resmlp_apply(params, X, alpha=alphas, return_preacts=True)
    A, B = [], []
    for z, r in pre:
        t = jax.nn.relu(z)
        szz, szr, srr = jnp.sum(z * z, 0), z.T @ r, jnp.sum(r * r)
        tz, tr = jnp.sum(t * z, 0), t.T @ r
        det = szz * srr - szr ** 2
        A.append((tz * srr - tr * szr) / det)
        B.append((szz * tr - szr * tz) / det)
    return jnp.stack(A), jnp.stack(B)


def kernel_predictions(Xtr, Xte, ytr, yte, candidates, alphas, lr, steps, centred):
    """Lazy-regime predicted test MSE: base, after surgery (cross-kernels) and retrained, per candidate."""
    depth, n = len(alphas), len(Xtr)

    def cross(Xa, Xb, ra, rb):
        S, T = ntk.resnet_cross_kernels(Xa, Xb, depth=depth, alpha=alphas, replace_x=ra, replace_z=rb)
        return np.asarray(S), np.asarray(T) / n

    train_kernels = {repr(None): cross(Xtr, Xtr, None, None)}

    def mse(rep_b, rep_a):
        key = repr(rep_a)
        if key not in train_kernels:
            train_kernels[key] = cross(Xtr, Xtr, rep_a, rep_a)
        S_aa, K = train_kernels[key]
        S_ba, K_ba = cross(Xte, Xtr, rep_b, rep_a)
        extra = {} if centred else {
            "nngp": S_aa, "nngp_test": S_ba,
            "nngp_test_diag": np.diag(cross(Xte[:1], Xte[:1], rep_b, rep_b)[0]).repeat(len(Xte))}  # zonal: constant
        mean, var = ntk.lazy_gd_prediction(K, K_ba, ytr, lr=lr, steps=steps, **extra)
        return float(np.mean((np.asarray(mean) - yte) ** 2 + np.asarray(var)))

    base = mse(None, None)
    return base, [(mse(rep, None) - base, mse(rep, rep) - base) for _, _, rep in candidates]


def spectral_predictions(candidates, alphas, d, degrees, lr, steps):
    kmax = max(degrees)
    energy = np.zeros(kmax + 1)
    energy[list(degrees)] = 1 / len(degrees)

    def kappa(rep):
        return lambda t: np.asarray(ntk.resnet_ntk_dot(jnp.asarray(t), depth=len(alphas), alpha=alphas, replace=rep))

    mu = ntk.zonal_spectrum(kappa(None), d, kmax, 6000)
    effects = {(r["block"], r["op"]): r for r in ntk.replacement_effects(depth=len(alphas), alpha=alphas, d=d,
                                                                          kmax=kmax, n_quad=6000)}
    out = []
    for block, op, _ in candidates:
        e = effects[(block, op)]
        mu_new = mu * (1 + e["spectrum_change"])
        resid = np.sum(energy * ((1 - lr * mu_new) ** (2 * steps) - (1 - lr * mu) ** (2 * steps)))
        out.append((e["kernel_change"], float(resid)))
    return out


def rank_table(rows, pred_keys, meas_keys):
    table = {}
    for pk in pred_keys:
        for mk in meas_keys:
            entry = {}
            for group in (*OPS, "all"):
                sel = [r for r in rows if group in ("all", r["op"])]
                p, q = [r[pk] for r in sel], [r[mk] for r in sel]
                rho, pval = spearmanr(p, q) if np.ptp(p) > 0 and np.ptp(q) > 0 else (float("nan"), float("nan"))
                entry[group] = {"rho": float(rho), "p": float(pval), "n": len(sel)}
            table[f"{pk} vs {mk}"] = entry
    return table


def run_setting(args, setting, data, profile):
    """setting: name, alpha, width, centred, steps, seeds, optimizer ("gd" with lr = 1/lambda_max, or
    "adam" with lr `--adam-lr`; the predictions always model GD)."""
    name, alpha, width, centred, steps = (setting[k] for k in ("name", "alpha", "width", "centred", "steps"))
    Xtr, Xte, ytr, yte = data
    depth = args.depth
    alphas = alpha * profile
    candidates = ntk.candidate_replacements(depth)
    K = np.asarray(ntk.resnet_ntk(Xtr, depth=depth, alpha=alphas)) / len(Xtr)
    lr = float(1.0 / np.linalg.eigvalsh(K).max())
    # lazy predictions (float64, exact data)
    base_pred, lazy = kernel_predictions(Xtr, Xte, ytr, yte, candidates, alphas, lr, steps, centred)
    spectral = spectral_predictions(candidates, alphas, args.d, args.degrees, lr, steps)
    # networks (float32)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    Xtr32, Xte32, ytr32, yte32, al32 = map(f32, (Xtr, Xte, ytr, yte, alphas))
    c = float(centred)
    hermite = [ntk.surgery_spec(depth, width, rep) for _, _, rep in candidates]
    specs = stack([ntk.surgery_spec(depth, width)] + hermite)
    opt = optax.sgd(lr) if setting["optimizer"] == "gd" else optax.adam(args.adam_lr)
    train = make_trainer(Xtr32, ytr32, steps, c, opt)
    seeds = []
    for seed in tqdm(range(setting["seeds"]), desc=f"{name}: seeds (x{len(candidates) + 1} trainings)"):
        params0 = ntk.resmlp_init(jax.random.key(seed), args.d, width, depth)
        trained = train(params0, specs, al32)
        retrain = np.asarray(test_mse(trained, params0, specs, al32, Xte32, yte32, c))
        base = jax.tree.map(lambda a: a[0], trained)
        shared = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(candidates),) + a.shape), base)
        lin_a, lin_b = least_squares_standin(base, Xtr32, al32)
        ls = stack([ntk.surgery_spec(depth, width, rep, lin_a=lin_a, lin_b=lin_b) for _, _, rep in candidates])
        surgery = np.asarray(test_mse(shared, params0, ls, al32, Xte32, yte32, c))
        surgery_h = np.asarray(test_mse(shared, params0, stack(hermite), al32, Xte32, yte32, c))
        seeds.append({"base": float(retrain[0]), "retrain": retrain[1:] - retrain[0],
                      "surgery": surgery - retrain[0], "surgery_hermite": surgery_h - retrain[0]})
    rows = []
    for j, (block, op, _) in enumerate(candidates):
        rows.append({"block": block, "op": op, "kernel": spectral[j][0], "spectral": spectral[j][1],
                     "lazy_surgery": lazy[j][0], "lazy_retrain": lazy[j][1],
                     **{key: float(np.mean([s[key][j] for s in seeds])) for key in
                        ("surgery", "surgery_hermite", "retrain")},
                     "retrain_seed_std": float(np.std([s["retrain"][j] for s in seeds]))})
    ranks = rank_table(rows, ["kernel", "spectral", "lazy_surgery", "lazy_retrain"],
                       ["surgery", "surgery_hermite", "retrain"])
    # magnitudes, not just ranks: median measured / predicted change per op
    ratios = {f"{mk} / {pk}": {op: float(np.median([r[mk] / r[pk] for r in rows if r["op"] == op])) for op in OPS}
              for pk, mk in (("lazy_surgery", "surgery"), ("lazy_surgery", "surgery_hermite"),
                             ("lazy_retrain", "retrain"))}
    return {**setting, "alphas": alphas.tolist(), "lr": lr,
            "base_test_mse": {"predicted": base_pred, "measured": [s["base"] for s in seeds]},
            "rows": rows, "spearman": ranks, "median_ratio": ratios}


def plot(results, path_scatter, path_blocks):
    colours = {"remove": "C3", "linear": "C0", "fuse": "C2"}
    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.6 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        for ax, (pk, mk, title) in zip(row, (("lazy_surgery", "surgery", "surgery on the trained net"),
                                             ("lazy_retrain", "retrain", "retrained from scratch"))):
            for op in OPS:
                sel = [r for r in res["rows"] if r["op"] == op]
                ax.scatter([r[pk] for r in sel], [r[mk] for r in sel], c=colours[op], s=18,
                           label=f"{op} (rho {res['spearman'][f'{pk} vs {mk}'][op]['rho']:.2f})")
            lo = min(min(r[pk] for r in res["rows"]), min(r[mk] for r in res["rows"]))
            hi = max(max(r[pk] for r in res["rows"]), max(r[mk] for r in res["rows"]))
            ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
            ax.set_title(f"{res['name']}: {title}, all rho {res['spearman'][f'{pk} vs {mk}']['all']['rho']:.2f}",
                         fontsize=8)
            ax.set_xlabel("predicted test-MSE change (lazy regime)", fontsize=8)
            ax.set_ylabel("measured test-MSE change", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_scatter, dpi=70)
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 3.2 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        for ax, (pk, mk, title) in zip(row, (("lazy_surgery", "surgery", "surgery"), ("lazy_retrain", "retrain",
                                                                                     "retrain"))):
            for k, op in enumerate(OPS):
                sel = [r for r in res["rows"] if r["op"] == op]
                x = np.array([r["block"] for r in sel]) + (k - 1) * 0.27
                ax.bar(x - 0.065, [r[mk] for r in sel], 0.13, color=colours[op], label=f"{op} measured")
                ax.bar(x + 0.065, [r[pk] for r in sel], 0.13, color="none", edgecolor=colours[op], hatch="///",
                       label=f"{op} predicted")
            ax.axhline(0, color="k", lw=0.5)
            ax.set_title(f"{res['name']}: {title}", fontsize=8)
            ax.set_xlabel("block i (fuse = i with i+1)", fontsize=8)
            ax.set_ylabel("test-MSE change", fontsize=8)
        row[0].legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path_blocks, dpi=70)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--small-width", type=int, default=64)
    ap.add_argument("--large-alpha", type=float, default=1.0)
    ap.add_argument("--d", type=int, default=3)
    ap.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--n-test", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=2, help="seeds at --width (twice as many at --small-width)")
    ap.add_argument("--adam-lr", type=float, default=3e-3)
    ap.add_argument("--only", type=int, nargs="+", help="indices of the settings to run (default: all)")
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    target = harmonic_target(rng, args.degrees, args.d)
    Xtr, Xte = sphere(rng, args.n, args.d), sphere(rng, args.n_test, args.d)
    data = (jnp.asarray(Xtr), jnp.asarray(Xte), target(Xtr), target(Xte))
    profile = rng.uniform(0.5, 1.5, args.depth)
    profile /= np.sqrt(np.mean(profile ** 2))
    lazy = {"alpha": args.depth ** -0.5, "width": args.width, "centred": True, "steps": args.steps,
            "seeds": args.seeds, "optimizer": "gd"}
    small = {"width": args.small_width, "seeds": 2 * args.seeds}
    settings = [{**lazy, "name": f"alpha=L^-1/2, m={args.width}"},
                {**lazy, "alpha": args.large_alpha, "name": f"alpha={args.large_alpha:g}, m={args.width}"},
                {**lazy, **small, "name": f"alpha=L^-1/2, m={args.small_width}"},
                {**lazy, **small, "alpha": 2 * args.large_alpha, "steps": 3 * args.steps,
                 "name": f"alpha={2 * args.large_alpha:g}, m={args.small_width}, {3 * args.steps} steps"},
                {**lazy, "optimizer": "adam", "name": f"alpha=L^-1/2, m={args.width}, Adam"},
                {**lazy, "centred": False, "name": f"alpha=L^-1/2, m={args.width}, raw f"}]
    settings = [settings[i] for i in args.only] if args.only else settings
    t0 = time.time()
    results = [run_setting(args, s, data, profile) for s in settings]
    summary = {"args": vars(args), "profile": profile.tolist(), "seconds": time.time() - t0, "settings": results}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "block_replacement.json").write_text(json.dumps(summary, indent=1))
    plot(results, OUT / "block_replacement.png", OUT / "block_replacement_blocks.png")
    for res in results:
        b = res["base_test_mse"]
        print(f"\n{res['name']}: base test MSE predicted {b['predicted']:.4f}, measured {np.round(b['measured'], 4)}")
        for key, entry in res["spearman"].items():
            print(f"  {key:32s}" + "  ".join(f"{g} {v['rho']:+.2f}" for g, v in entry.items()))
        for key, entry in res["median_ratio"].items():
            print(f"  median {key:25s}" + "  ".join(f"{op} {v:.2f}" for op, v in entry.items()))
    print(f"{summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
