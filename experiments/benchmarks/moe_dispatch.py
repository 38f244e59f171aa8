"""MoE dispatch: "dense" vs "ragged" vs "batched" (vs "pallas" on a GPU) `moe_ffn`, forward and forward+backward, one process.

    python experiments/benchmarks/moe_dispatch.py [--repeats 7] [--quick] [--out PATH]

Shapes: a small one (E=8, top-2) and Nemotron 3 Nano's routing (E=128, top-6, hidden 2688, expert
width 1856) with the widths scaled down to fit a CPU, and the MoE layers of cpu_vs_hf.py, each
dropless and at capacity factor 1.25 (C: slots per expert; dropless "batched" picks its own).
Routing comes from `route` on random router logits (sigmoid, near-uniform load), as in training.

Each case is jitted per implementation, warmed up, then timed in rounds that run every
implementation once (block_until_ready) in turn; a time is the median over rounds and a ratio vs
"ragged" is the median of the per-round ratios, which cancels most of the noise from other
processes on a shared machine. fwd+bwd is jax.grad of sum(y * g) w.r.t. x, the routing weights and
both expert weight tensors. Results (JSON) go to --out, default experiments/benchmarks/results/moe_dispatch.json.
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
import jax.numpy as jnp
import numpy as np

from nemojax.ops.moe import IMPLEMENTATIONS, capacity, default_implementation, moe_ffn, route

ROOT = Path(__file__).resolve().parents[2]

# name: (tokens T, hidden D, expert width F, experts E, top-k K)
SHAPES = {
    "small": (512, 64, 128, 8, 2),
    "nano/16": (1024, 168, 116, 128, 6),  # Nemotron 3 Nano routing, widths 2688 / 1856 divided by 16
    "hf-bench": (1024, 512, 384, 16, 4),  # the MoE layers of cpu_vs_hf.py
}
QUICK_SHAPES = {"small": (256, 32, 64, 8, 2), "nano/32": (256, 84, 58, 128, 6)}


def make_case(t, d, f, e, k, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (t, d), jnp.float32)
    weights, indices = route(jax.random.normal(ks[1], (t, e)), jnp.zeros((e,)), top_k=k)
    w_up = jax.random.normal(ks[2], (e, d, f), jnp.float32) / np.sqrt(d)
    w_down = jax.random.normal(ks[3], (e, f, d), jnp.float32) / np.sqrt(f)
    g = jax.random.normal(ks[4], (t, d), jnp.float32)
    return x, weights, indices, w_up, w_down, g


def compiled(impl, cf, mode):
    def fwd(x, weights, indices, w_up, w_down, g):
        return moe_ffn(x, weights, indices, w_up, w_down, implementation=impl, capacity_factor=cf)

    def loss(x, weights, indices, w_up, w_down, g):
        return jnp.sum(fwd(x, weights, indices, w_up, w_down, g) * g)

    if mode == "fwd":
        return jax.jit(fwd)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4)))


def timed(fn, args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def bench_case(args, impls, cf, mode, repeats):
    fns = {i: compiled(i, cf, mode) for i in impls}
    for fn in fns.values():  # compile + warm up
        timed(fn, args)
        timed(fn, args)
    rounds = [{i: timed(fns[i], args) for i in impls} for _ in range(repeats)]
    out = {}
    for i in impls:
        ts = [r[i] for r in rounds]
        out[i] = {"ms": 1e3 * float(np.median(ts)), "ms_min": 1e3 * float(np.min(ts)),
                  "vs_ragged": float(np.median([r[i] / r["ragged"] for r in rounds]))}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "experiments/benchmarks/results/moe_dispatch.json"))
    ap.add_argument("--shapes", default=None, help="comma-separated subset of " + ",".join(SHAPES))
    a = ap.parse_args()
    shapes = QUICK_SHAPES if a.quick else SHAPES
    if a.shapes:
        shapes = {n: SHAPES[n] for n in a.shapes.split(",")}
    repeats = 3 if a.quick else a.repeats
    # "pallas" (the gmm kernel) only runs compiled on a GPU; on a CPU it is interpreted (tests only)
    impls = [i for i in IMPLEMENTATIONS if i != "pallas" or jax.default_backend() == "gpu"]
    results = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": str(jax.devices()),
               "cpu_count": os.cpu_count(), "machine": platform.machine(),
               "date": datetime.date.today().isoformat(), "repeats": repeats, "cases": []}
    print(f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs), median of {repeats} rounds")
    print(f"{'shape':>8} {'T,D,F,E,K':>22} {'cf':>5} {'C':>5} {'mode':>8} | "
          + " | ".join(f"{i:>17}" for i in impls))
    for name, (t, d, f, e, k) in shapes.items():
        args = make_case(t, d, f, e, k)
        for cf in (None, 1.25):
            for mode in ("fwd", "fwd+bwd"):
                r = bench_case(args, impls, cf, mode, repeats)
                results["cases"].append({"shape": name, "T": t, "D": d, "F": f, "E": e, "K": k,
                                         "capacity_factor": cf, "capacity": capacity(t, k, e, cf) if cf else None, "mode": mode,
                                         "results": r})
                cells = " | ".join(f"{r[i]['ms']:8.2f} ms {r[i]['vs_ragged']:5.2f}x" for i in impls)
                print(f"{name:>8} {f'{t},{d},{f},{e},{k}':>22} {str(cf):>5} {capacity(t, k, e, cf) if cf else '-':>5} {mode:>8} | "
                      f"{cells}", flush=True)
    results["default_now"] = default_implementation()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"(x = median time ratio vs ragged per round)  wrote {a.out}")


if __name__ == "__main__":
    main()
