"""Experiment 3b: with a non-uniform input density p on the circle, GD fits the target at x in a number
of iterations proportional to 1/p(x) (Basri et al. 2020: convergence at x in O(k^2 / p(x))).

n points are drawn (jittered quantiles) from p(theta) = (1 + a cos theta) / (2 pi); the same wide
two-layer ReLU network as experiment 3 (width m, biases of scale beta, all layers trained, f0
subtracted) fits y = sin(k theta) by full-batch GD on (1/2n)|f - y|^2 with lr = 1/lambda_max(K/n).
The circle is cut into `--bins` arcs; in each arc we record the first iteration at which the arc's RMS
residual falls below `tol` times its start, for the trained network and for the kernel-regime
prediction r_t = (I - lr K/n)^t y of the analytic NTK, and fit log(iterations) against log p(arc).
Why 1/p: for a high-frequency residual the NTK integral operator acts locally,
int K(x, z) r(z) p(z) dz ~ p(x) (K * r)(x), so the local decay rate of frequency k is p(x) mu_k.

    python experiments/ntk/density_bias.py [--ks 2 4 6 8 12 16] [--net-ks 4 6 8] [--a 0.8]
Writes experiments/ntk/results/density_bias.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from frequency_bias_msk import init, net  # noqa: E402  (sibling script: the same two-layer network)
from tqdm import tqdm  # noqa: E402

from nemojax import ntk  # noqa: E402

OUT = Path(__file__).parent / "results"


def sample_angles(n, a, rng):
    """Jittered quantiles of p(theta) = (1 + a cos theta)/(2 pi) on [-pi, pi): exact density, no clumping."""
    grid = np.linspace(-np.pi, np.pi, 200001)
    cdf = (grid + np.pi + a * np.sin(grid)) / (2 * np.pi)
    return np.interp((np.arange(n) + rng.random(n)) / n, cdf, grid)


def first_hits(rms, start, tol, steps):
    """Per arc: the first of `steps` with rms <= tol * start (nan if never). rms is [len(steps), bins]."""
    hit = rms <= tol * start[None, :]
    return np.where(hit.any(0), steps[np.argmax(hit, 0)].astype(float), np.nan)


def arc_rms(R, arc, bins):
    """RMS of residuals R [..., n] within each arc -> [..., bins]."""
    onehot = np.eye(bins)[arc]
    return np.sqrt((R ** 2) @ onehot / onehot.sum(0))


def kernel_hits(K, y, lr, arc, bins, tol, cap=10 ** 6):
    lam, V = np.linalg.eigh(K)
    steps = np.unique(np.round(np.logspace(0, np.log10(cap), 600)).astype(int))
    R = ((1 - lr * lam)[None, :] ** steps[:, None] * (V.T @ y)[None, :]) @ V.T
    return first_hits(arc_rms(R, arc, bins), arc_rms(y, arc, bins), tol, steps)


def network_hits(X, y, p0, f0, lr, beta, arc, bins, tol, cap):
    """Full-batch GD, arc RMS recorded every step (200 steps per host round-trip)."""
    onehot = jnp.asarray(np.eye(bins)[arc], jnp.float32)
    counts = onehot.sum(0)
    yj = jnp.asarray(y, jnp.float32)

    def loss(p):
        r = net(p, X, beta) - f0 - yj
        return 0.5 * jnp.mean(r ** 2), r

    @jax.jit
    def run(p):
        def body(p, _):
            (_, r), g = jax.value_and_grad(loss, has_aux=True)(p)
            return jax.tree.map(lambda a, b: a - lr * b, p, g), jnp.sqrt((r ** 2) @ onehot / counts)
        return jax.lax.scan(body, p, None, length=200)

    start = arc_rms(y, arc, bins)
    p, t, hits = p0, 0, np.full(bins, np.nan)
    while t < cap and np.isnan(hits).any():
        p, rms = run(p)
        new = first_hits(np.asarray(rms), start, tol, np.arange(t, t + 200))
        hits = np.where(np.isnan(hits), new, hits)
        t += 200
    return hits


def sparse_dense(p, its, arcs=2):
    """Mean iterations over the `arcs` sparsest and over the `arcs` densest arcs."""
    order = np.argsort(p)
    return [float(np.mean(its[order[:arcs]])), float(np.mean(its[order[-arcs:]]))]


def loglog_slope(p, its):
    ok = np.isfinite(its)
    return float(np.polyfit(np.log(p[ok]), np.log(its[ok]), 1)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6, 8, 12, 16])
    ap.add_argument("--net-ks", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--a", type=float, default=0.8)
    ap.add_argument("--bins", type=int, default=16)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--tol", type=float, default=0.1)
    ap.add_argument("--cap", type=int, default=40000, help="GD steps for the network")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    start = time.monotonic()
    jax.config.update("jax_enable_x64", True)
    theta = sample_angles(args.n, args.a, np.random.default_rng(args.seed))
    density = (1 + args.a * np.cos(theta)) / (2 * np.pi)
    arc = np.minimum(((theta + np.pi) / (2 * np.pi) * args.bins).astype(int), args.bins - 1)
    p_arc = np.bincount(arc, density) / np.bincount(arc)
    X64 = np.stack([np.cos(theta), np.sin(theta)], 1)
    K = np.asarray(ntk.fc_ntk(jnp.asarray(X64), depth=2, bias=args.beta)) / args.n
    lr = float(1.0 / np.linalg.eigvalsh(K).max())
    X = jnp.asarray(X64, jnp.float32)
    # the network runs in float32 (x64 is on for the kernel's eigendecomposition)
    p0 = jax.tree.map(lambda v: v.astype(jnp.float32), init(jax.random.key(args.seed), args.width, args.beta))
    f0 = net(p0, X, args.beta)
    rows = []
    for k in tqdm(args.ks, desc="frequencies"):
        y = np.sin(k * theta)
        row = {"k": k, "kernel_iterations": kernel_hits(K, y, lr, arc, args.bins, args.tol)}
        row["kernel_slope"] = loglog_slope(p_arc, row["kernel_iterations"])
        row["kernel_sparse_dense"] = sparse_dense(p_arc, row["kernel_iterations"])
        if k in args.net_ks:
            row["network_iterations"] = network_hits(X, y, p0, f0, lr, args.beta, arc, args.bins, args.tol, args.cap)
            row["network_slope"] = loglog_slope(p_arc, row["network_iterations"])
            row["network_sparse_dense"] = sparse_dense(p_arc, row["network_iterations"])
        rows.append(row)
    summary = {"args": vars(args), "seconds": time.monotonic() - start, "arc_density": p_arc.tolist(), "predicted_slope": -1.0,
               "rows": [{key: (v.tolist() if isinstance(v, np.ndarray) else v) for key, v in r.items()} for r in rows]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "density_bias.json").write_text(json.dumps(summary, indent=1))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(rows):
        c = f"C{i}"
        axes[0].loglog(p_arc, r["kernel_iterations"], "-", color=c, label=f"k={r['k']} NTK ({r['kernel_slope']:.2f})")
        if "network_iterations" in r:
            axes[0].loglog(p_arc, r["network_iterations"], "o", color=c, ms=4,
                           label=f"k={r['k']} network ({r['network_slope']:.2f})")
    ref = rows[-1]["kernel_iterations"]
    mid = np.nanmedian(ref * p_arc)
    axes[0].loglog(p_arc, mid / p_arc, "k:", label="1/p")
    axes[0].set_xlabel("density p(theta) of the arc")
    axes[0].set_ylabel(f"iterations to arc RMS < {args.tol} x start")
    axes[0].legend(fontsize=7)
    centres = -np.pi + (np.arange(args.bins) + 0.5) * 2 * np.pi / args.bins
    for i, r in enumerate(rows):
        axes[1].semilogy(centres, r["kernel_iterations"], "-", color=f"C{i}", label=f"k={r['k']}")
    axes[1].twinx().plot(centres, p_arc, "k--", label="p(theta)")
    axes[1].set_xlabel("theta (arc centre); dashed: density")
    axes[1].set_ylabel("NTK-predicted iterations")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "density_bias.png", dpi=80)
    for r in rows:
        print(f"k={r['k']:3d}  kernel slope {r['kernel_slope']:.2f}"
              + (f"  network slope {r['network_slope']:.2f}" if "network_slope" in r else ""))


if __name__ == "__main__":
    main()
