"""MoE dispatch: every `moe_ffn` implementation (but "pallas" off a GPU), forward and forward+backward, one process.

    python experiments/benchmarks/moe_dispatch.py [--repeats 5] [--shapes a,b] [--quick] [--out PATH]

Shapes: a small one (E=8, top-2); Nemotron 3 Nano's routing (E=128, top-6, hidden 2688, expert
width 1856) with the widths divided by 16 to fit a CPU; the MoE layers of cpu_vs_hf.py at widths
512 and 256 for a training step (1024 tokens) and for one decode step (4 tokens).

Routers: "balanced" routes random logits (sigmoid; the busiest expert gets ~1.1-1.4x the mean
load, as a router trained with the correction bias does); "unbalanced" adds a fixed random offset
per expert, scaled until the busiest expert gets 3.5x the mean load (`--busiest`), as the random
initialisation of cpu_vs_hf.py's models does (3-4x). Each is run dropless; the balanced one also at
capacity factor 1.25 (C = slots per expert).

Each case is jitted per implementation, warmed up, then timed in rounds that run every
implementation once (block_until_ready) in turn; a time is the median over rounds, its spread the
min and max, and a ratio vs the backend's default implementation is the median of the per-round
ratios, which cancels most of the noise from other processes on a shared machine. Process CPU time
(all threads) is recorded beside wall time. fwd+bwd is jax.grad of sum(y * g) w.r.t. x, the routing
weights and both expert weight tensors. Results (JSON) go to --out, default
experiments/benchmarks/results/moe_dispatch.json.
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
    "hf-bench-512": (1024, 512, 384, 16, 4),  # the MoE layers of cpu_vs_hf.py, training step
    "hf-bench-256": (1024, 256, 192, 16, 4),
    "decode-512": (4, 512, 384, 16, 4),  # one greedy decode step of cpu_vs_hf.py (batch 4)
}
QUICK_SHAPES = {"small": (256, 32, 64, 8, 2), "nano/32": (256, 84, 58, 128, 6)}


def busiest_over_mean(indices, e: int) -> float:
    counts = np.bincount(np.asarray(indices).ravel(), minlength=e)
    return float(counts.max() / counts.mean())


def routing(logits, k: int, router: str, target: float):
    """(weights, indices): random logits as they come, or with per-expert offsets s * z_e, s found
    by bisection so that the busiest expert gets `target` times the mean load."""
    t, e = logits.shape
    if router == "balanced":
        return route(logits, jnp.zeros((e,)), top_k=k)
    z = jax.random.normal(jax.random.key(1), (e,))
    lo, hi = 0.0, 64.0
    for _ in range(40):
        s = (lo + hi) / 2
        if busiest_over_mean(route(logits + s * z, jnp.zeros((e,)), top_k=k)[1], e) < target:
            lo = s
        else:
            hi = s
    return route(logits + hi * z, jnp.zeros((e,)), top_k=k)


def make_case(t, d, f, e, k, router, target, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (t, d), jnp.float32)
    weights, indices = routing(jax.random.normal(ks[1], (t, e)), k, router, target)
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
    c, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, time.process_time() - c


def bench_case(args, impls, base, cf, mode, repeats):
    fns = {i: compiled(i, cf, mode) for i in impls}
    for fn in fns.values():  # compile + warm up
        timed(fn, args)
        timed(fn, args)
    rounds = [{i: timed(fns[i], args) for i in impls} for _ in range(repeats)]
    out = {}
    for i in impls:
        wall, cpu = np.array([r[i][0] for r in rounds]), np.array([r[i][1] for r in rounds])
        out[i] = {"ms": 1e3 * float(np.median(wall)), "ms_min": 1e3 * float(wall.min()),
                  "ms_max": 1e3 * float(wall.max()), "cpu_ms": 1e3 * float(np.median(cpu)),
                  "vs_default": float(np.median([r[i][0] / r[base][0] for r in rounds])),
                  "vs_default_cpu": float(np.median([r[i][1] / r[base][1] for r in rounds]))}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--busiest", type=float, default=3.5, help="busiest expert / mean load, unbalanced router")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats (smoke test)")
    ap.add_argument("--out", default=str(ROOT / "experiments/benchmarks/results/moe_dispatch.json"))
    ap.add_argument("--shapes", default=None, help="comma-separated subset of " + ",".join(SHAPES))
    a = ap.parse_args()
    shapes = QUICK_SHAPES if a.quick else SHAPES
    if a.shapes:
        shapes = {n: SHAPES[n] for n in a.shapes.split(",")}
    repeats = 3 if a.quick else a.repeats
    base = default_implementation()
    # "pallas" (the gmm kernel) only runs compiled on a GPU; on a CPU it is interpreted (tests only)
    impls = [i for i in IMPLEMENTATIONS if i != "pallas" or jax.default_backend() == "gpu"]
    results = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": str(jax.devices()),
               "cpu_count": os.cpu_count(), "machine": platform.machine(),
               "date": datetime.date.today().isoformat(), "repeats": repeats, "default": base,
               "load_avg_at_start": os.getloadavg(), "cases": []}
    print(f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs, load {os.getloadavg()}), "
          f"median of {repeats} rounds, ratios vs the default {base!r}")
    print(f"{'shape':>12} {'router':>10} {'busiest':>7} {'cf':>5} {'C':>5} {'mode':>8} | "
          + " | ".join(f"{i:>17}" for i in impls))
    for name, (t, d, f, e, k) in shapes.items():
        for router, cfs in (("balanced", (None, 1.25)), ("unbalanced", (None,))):
            args = make_case(t, d, f, e, k, router, a.busiest)
            busiest = busiest_over_mean(args[2], e)
            for cf in cfs:
                cap = capacity(t * k, e, cf, limit=t) if cf else None
                for mode in ("fwd", "fwd+bwd"):
                    r = bench_case(args, impls, base, cf, mode, repeats)
                    results["cases"].append({"shape": name, "T": t, "D": d, "F": f, "E": e, "K": k, "router": router,
                                             "busiest_over_mean": busiest, "capacity_factor": cf, "capacity": cap,
                                             "mode": mode, "results": r})
                    cells = " | ".join(f"{r[i]['ms']:8.2f} ms {r[i]['vs_default']:5.2f}x" for i in impls)
                    print(f"{name:>12} {router:>10} {busiest:7.2f} {str(cf):>5} {cap or '-':>5} {mode:>8} | {cells}",
                          flush=True)
    results["load_avg_at_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"(x = median per-round time ratio vs {base})  wrote {a.out}")


if __name__ == "__main__":
    main()
