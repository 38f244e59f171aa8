"""Experiment 2: the residual NTK with alpha = L^-gamma, gamma in {0.25, 0.5, 1}, as depth L grows:
the normalised kernel K(u)/K(1) on the circle-free zonal form and its spectrum on S^2 (d = 3),
including the odd/even eigenvalue balance.

    python experiments/ntk/resnet_depth_scaling.py [--depths 1 2 4 8 16 32 64]
Writes experiments/ntk/results/resnet_depth_scaling.{json,png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nemojax import ntk  # noqa: E402

OUT = Path(__file__).parent / "results"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--d", type=int, default=3)
    ap.add_argument("--kmax", type=int, default=12)
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    u = np.linspace(-1, 1, 201)
    res = {"d": args.d, "runs": []}
    fig, axes = plt.subplots(2, len(args.gammas), figsize=(5 * len(args.gammas), 8))
    for col, gamma in enumerate(args.gammas):
        for L in tqdm(args.depths, desc=f"gamma={gamma}"):
            alpha = L ** -gamma

            def kappa(t, L=L, alpha=alpha):
                return np.asarray(ntk.resnet_ntk_dot(jnp.asarray(t), depth=L, alpha=alpha))

            k_u = kappa(u)
            mu = ntk.zonal_spectrum(kappa, args.d, args.kmax, 6000)
            odd_even = float(mu[3] / mu[2])
            res["runs"].append({"gamma": gamma, "depth": L, "alpha": alpha, "K1": float(k_u[-1]),
                                "normalised_kernel": (k_u / k_u[-1]).tolist(), "K0_over_K1": float(kappa(0.0) / k_u[-1]),
                                "mu": mu.tolist(),
                                "mu3_over_mu2": odd_even})
            axes[0, col].plot(u, k_u / k_u[-1], label=f"L={L}")
            axes[1, col].semilogy(np.arange(args.kmax + 1), np.abs(mu) / mu[0], "o-", ms=3, label=f"L={L}")
        axes[0, col].set_title(f"alpha = L^-{gamma}: K(u)/K(1)")
        axes[0, col].set_xlabel("u = <x, z>")
        axes[1, col].set_title(f"alpha = L^-{gamma}: mu_k/mu_0 on S^{args.d - 1}")
        axes[1, col].set_xlabel("k")
        axes[0, col].legend(fontsize=7)
        axes[1, col].legend(fontsize=7)
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "resnet_depth_scaling.png", dpi=70)
    (OUT / "resnet_depth_scaling.json").write_text(json.dumps(res))
    print("gamma  depth  K(1)     K(0)/K(1)  mu3/mu2")
    for r in res["runs"]:
        print(f"{r['gamma']:5.2f} {r['depth']:5d}  {r['K1']:8.3f}  {r['K0_over_K1']:8.4f}  {r['mu3_over_mu2']:8.4f}")


if __name__ == "__main__":
    main()
