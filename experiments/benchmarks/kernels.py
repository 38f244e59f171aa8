"""Pallas kernels vs their XLA baselines, one process: SSD, grouped matmul (MoE), fused relu^2 FFN.

    python experiments/benchmarks/kernels.py [--only ssd,gmm,ffn,ffn_narrow,e2e] [--quick] [--repeats 20]
        [--mamba-ssm PATH] [--out PATH]

Cases (default: the issue's Nemotron shapes, bf16; they need a GPU):
- ssd:  Mamba-2 SSD at a Nemotron-H-8B layer (b=4, L=4096, H=128, P=64, G=8, N=128, chunk 128),
        `ssd(..., implementation="xla")` vs "pallas", plus, with --mamba-ssm PATH (a local checkout of
        state-spaces/mamba), its Triton `mamba_chunk_scan_combined` through torch on the same
        device and the same inputs (DLPack, no copy). fwd and fwd+bwd, with the fraction of the
        device roofline reached and which bound binds.
- gmm:  MoE expert grouped matmul at Nemotron 3 Nano shapes (128 experts, top-6, d=2688, expert
        width 1856, 4K tokens: M = 24576 rows, near-balanced random routing), up and down
        projection: `jax.lax.ragged_dot` vs Pallas `gmm`, fwd and fwd+bwd, plus a dense GEMM of the
        same FLOPs ([M, K] x [K, N]) whose time gives the "fraction of dense throughput".
- ffn:  fused relu^2 FFN at Nemotron-H-8B width (4096 -> 21504 -> 4096, 8192 tokens): the XLA MLP
        (`reference.relu2_ffn`) vs Pallas `fused_relu2_ffn`, fwd and fwd+bwd.
- ffn_narrow: the same at D = 128 (one output tile), 64K tokens, F = 512: the regime the fusion is for.
- e2e:  whole models of Nemotron-shaped layers in bf16 (the first 8 layers "M-M-M-M*" of
        nemotron-h-8b and the first 6 "MEMEM*" of nemotron-3-nano, vocabulary cut to 32K; --quick:
        tiny-hybrid and tiny-moe in fp32): a training step (value_and_grad of the LM loss, b=2, L=4096)
        and a greedy decode loop (b=8, 64-token prompt, 64 new tokens) with the default
        implementations vs `nj.configure_kernels(model, ssd="pallas", ffn="pallas", moe="pallas")`.

Method (experiments/benchmarks and the device notes): every case is checked first (relative error
of the kernel against the baseline on the benchmark inputs, printed); every function is jitted
and warmed up (compile, autotune) before timing; then `--repeats` rounds each run every
implementation once in turn with block_until_ready (torch: cuda synchronize); a time is the median
over rounds and a ratio is the median of the per-round ratios to the baseline, which cancels slow
drift. fwd+bwd is value_and_grad of sum(out * cotangent) with respect to every float input, so the
forward is part of it. Inputs are random (never zeros) and far larger than the L2 cache. Rooflines
use the device's datasheet peaks (table below) and, on a GPU, ceilings measured here (a 1 GiB
elementwise pass; an 8192^3 bf16 matmul). FLOPs are the matmul FLOPs of the math (fwd+bwd counted
as 3x fwd); bytes are each input read once and each output written once.

--quick uses tiny shapes so that the whole script runs on the CPU in a few seconds, with every
Pallas kernel in interpret mode: a smoke run. Interpret-mode CPU timings measure the interpreter
and say nothing about the kernels; the script prints so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

if "--mamba-ssm" in " ".join(sys.argv):
    # torch shares the GPU with JAX here: JAX must not preallocate most of its memory
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import nemojax as nj  # noqa: E402
from nemojax.ops import ssd as ssd_ops  # noqa: E402
from nemojax.ops.ffn import fused_relu2_ffn, relu2_ffn  # noqa: E402
from nemojax.ops.moe.pallas_gmm import gmm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# Datasheet peaks: dense bf16 tensor-core FLOP/s (no sparsity) and HBM bytes/s.
PEAKS = {
    "H100 SXM": {"match": ("H100 80GB HBM3", "H100 SXM"), "bf16_flops": 989e12, "hbm_bytes": 3.35e12},
    "H100 PCIe": {"match": ("H100 PCIe",), "bf16_flops": 756e12, "hbm_bytes": 2.0e12},
    "H100 NVL": {"match": ("H100 NVL",), "bf16_flops": 835e12, "hbm_bytes": 3.9e12},
    "H200": {"match": ("H200",), "bf16_flops": 989e12, "hbm_bytes": 4.8e12},
}

SHAPES = {
    "ssd": dict(b=4, l=4096, h=128, p=64, g=8, n=128, chunk=128),
    # 4K tokens (M = 24576 rows): at 16K, XLA's ragged_dot baseline asks for 87 GiB while
    # autotuning on an H200 (2026-11-29) and runs out of memory
    "gmm": dict(tokens=4096, experts=128, top_k=6, d=2688, f=1856),
    "ffn": dict(t=8192, d=4096, f=21504),
    # the regime the fused kernel is built for: D within one output tile (block_d = 128), so the up
    # projection is computed once and the [T, F] activation never leaves the chip
    "ffn_narrow": dict(t=65536, d=128, f=512),
    "e2e": dict(models={"nemotron-h-8b": 8, "nemotron-3-nano-30b-a3b": 6}, vocab=32768, train_b=2, train_l=4096,
                decode_b=8, prompt=64, new_tokens=64, dtype="bfloat16"),
}
QUICK_SHAPES = {
    "ssd": dict(b=1, l=256, h=4, p=16, g=2, n=16, chunk=64),
    "gmm": dict(tokens=64, experts=8, top_k=2, d=64, f=48),
    "ffn": dict(t=64, d=64, f=128),
    "ffn_narrow": dict(t=64, d=32, f=64),
    "e2e": dict(models={"tiny-hybrid": None, "tiny-moe": None}, vocab=None, train_b=2, train_l=64, decode_b=2,
                prompt=8, new_tokens=4, dtype="float32"),  # CPU dots take no bf16 x bf16 -> fp32
}


def device_peaks(device):
    kind = getattr(device, "device_kind", "")
    for name, p in PEAKS.items():
        if any(m in kind for m in p["match"]):
            return name, p
    return None, None


def sync(x):
    """Block on JAX arrays; torch tensors are synchronised by the torch wrappers."""
    return jax.block_until_ready(x)


def timed(fn, args):
    t0 = time.perf_counter()
    sync(fn(*args))
    return time.perf_counter() - t0


def bench(impls, repeats, warmup=2):
    """impls: {name: (fn, args)}, the first is the baseline. Rounds run each once in turn; the
    first warm-up call compiles (and autotunes the Triton reference)."""
    for fn, args in impls.values():
        for _ in range(warmup):
            timed(fn, args)
    rounds = [{name: timed(fn, args) for name, (fn, args) in impls.items()} for _ in range(repeats)]
    base = next(iter(impls))
    out = {}
    for name in impls:
        ts = np.array([r[name] for r in rounds])
        q25, q50, q75 = np.percentile(ts, [25, 50, 75])
        out[name] = {"ms": 1e3 * q50, "ms_min": 1e3 * ts.min(), "iqr_rel": (q75 - q25) / q50,
                     "vs_" + base: float(np.median([r[name] / r[base] for r in rounds]))}
    return out


def rel_err(a, ref):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def max_rel_err(outs, refs):
    return max(rel_err(a, r) for a, r in zip(jax.tree.leaves(outs), jax.tree.leaves(refs)))


def nbytes(*arrays):
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def fwd_and_train(fn, argnums):
    """(jitted fwd, jitted value_and_grad of sum(fn(*args) * ct)) with ct the last argument."""
    def loss(*args):
        *inputs, ct = args
        return jnp.sum(fn(*inputs).astype(jnp.float32) * ct)
    return jax.jit(lambda *a: fn(*a[:-1])), jax.jit(jax.value_and_grad(loss, argnums=argnums))


def roofline(flops, bytes_, ms, peaks):
    """Fraction of the roofline floor max(flops / peak FLOP/s, bytes / peak bandwidth) reached."""
    if not peaks:
        return None
    t_flops, t_bytes = flops / peaks["bf16_flops"], bytes_ / peaks["hbm_bytes"]
    floor = max(t_flops, t_bytes)
    return {"floor_ms": 1e3 * floor, "fraction": floor / (ms / 1e3),
            "binds": "dense bf16 compute" if t_flops >= t_bytes else "HBM bandwidth"}


# ----------------------------------------------------------------------------- ceilings


def measure_ceilings(repeats):
    x = jax.random.normal(jax.random.key(0), (512 * 1024 * 1024,), jnp.bfloat16)  # 1 GiB
    a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.bfloat16)
    r = bench({"copy": (jax.jit(lambda x: x * 2), (x,)),
               "matmul": (jax.jit(lambda a, b: a @ b), (a, b))}, repeats)
    return {"hbm_bytes": 2 * nbytes(x) / (r["copy"]["ms"] / 1e3),
            "bf16_flops": 2 * 8192 ** 3 / (r["matmul"]["ms"] / 1e3)}


# ----------------------------------------------------------------------------- cases


def load_mamba_chunk_scan(path):
    """state-spaces/mamba's Triton SSD, imported by file: stub parent packages so that neither
    mamba_ssm/__init__.py nor its CUDA extensions are imported."""
    pkg_root = Path(path).resolve() / "mamba_ssm"
    for name, sub in (("mamba_ssm", ""), ("mamba_ssm.ops", "ops"), ("mamba_ssm.ops.triton", "ops/triton")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(pkg_root / sub)]
            sys.modules[name] = mod
    name = "mamba_ssm.ops.triton.ssd_combined"
    spec = importlib.util.spec_from_file_location(name, pkg_root / "ops/triton/ssd_combined.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod.mamba_chunk_scan_combined


def torch_fns(mamba_fn, chunk):
    import torch

    def run_fwd(x, dt, A, B, C, ct):
        mamba_fn(*(torch.from_dlpack(a) for a in (x, dt, A, B, C)), chunk)
        torch.cuda.synchronize()
        return jnp.asarray(0.0)  # nothing for JAX to wait on

    def run_train(x, dt, A, B, C, ct):
        ts = [torch.from_dlpack(a).detach().requires_grad_(True) for a in (x, dt, A, B, C)]
        y = mamba_fn(*ts, chunk)
        loss = (y.float() * torch.from_dlpack(ct)).sum()
        loss.backward()
        torch.cuda.synchronize()
        return jnp.asarray(0.0)

    def outputs(x, dt, A, B, C, ct):
        ts = [torch.from_dlpack(a).detach().requires_grad_(True) for a in (x, dt, A, B, C)]
        y = mamba_fn(*ts, chunk)
        (y.float() * torch.from_dlpack(ct)).sum().backward()
        return [jnp.from_dlpack(t.detach().contiguous()) for t in (y, *(t.grad for t in ts))]

    return run_fwd, run_train, outputs


def case_ssd(s, a, peaks):
    b, l, h, p, g, n, q = (s[k] for k in ("b", "l", "h", "p", "g", "n", "chunk"))
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (b, l, h, p), jnp.bfloat16)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, l, h)) - 2.0)  # fp32, > 0, mostly < 1
    A = -jnp.exp(jax.random.uniform(ks[2], (h,), minval=0.0, maxval=2.0))
    B = jax.random.normal(ks[3], (b, l, g, n), jnp.bfloat16)
    C = jax.random.normal(ks[4], (b, l, g, n), jnp.bfloat16)
    ct = jax.random.normal(ks[5], (b, l, h, p), jnp.float32)
    args = (x, dt, A, B, C, ct)
    fns = {impl: fwd_and_train(lambda x, dt, A, B, C, impl=impl: ssd_ops.ssd(
        x, dt, A, B, C, chunk_size=q, return_final_state=False, implementation=impl), (0, 1, 2, 3, 4))
        for impl in ("xla", "pallas")}
    extra = {}
    if a.mamba_ssm:
        if jax.default_backend() != "gpu":
            print("  ssd: --mamba-ssm needs a GPU; skipped")
        else:
            try:
                extra["mamba_triton"] = torch_fns(load_mamba_chunk_scan(a.mamba_ssm), q)
            except Exception as e:  # a missing torch/triton/einops must not stop the JAX numbers
                print(f"  ssd: could not load mamba_ssm Triton SSD from {a.mamba_ssm}: {e!r}; skipped")
    # FLOPs per (batch, token): C B^T per group (Q N), the intra-chunk mix (Q P), the chunk states
    # and their read-out (2 N P), per head, 2 FLOPs per multiply-add
    flops = 2 * b * l * (g * q * n + h * (q * p + 2 * n * p))
    bytes_fwd = nbytes(x, dt, B, C) + nbytes(x)
    bytes_train = nbytes(x, dt, B, C, ct) + nbytes(x, dt, B, C)
    cases = []
    for mode, idx, fl, by in (("fwd", 0, flops, bytes_fwd), ("fwd+bwd", 1, 3 * flops, bytes_train)):
        run = {k: (f[idx], args) for k, f in fns.items()}
        run.update({k: (f[idx], args) for k, f in extra.items()})
        ref = fns["xla"][idx](*args)
        errs = {k: max_rel_err(fns[k][idx](*args), ref) for k in fns if k != "xla"}
        if "mamba_triton" in extra:
            outs = extra["mamba_triton"][2](*args)
            refs = [ref] if mode == "fwd" else [fns["xla"][0](*args), *ref[1]]
            errs["mamba_triton"] = max_rel_err(outs[:len(refs)], refs)
        r = bench(run, a.repeats, a.warmup)
        for k in r:
            r[k]["roofline"] = roofline(fl, by, r[k]["ms"], peaks)
        cases.append({"op": "ssd", "mode": mode, "shape": s, "flops": fl, "bytes": by, "rel_err_vs_xla": errs,
                      "results": r})
    return cases


def case_gmm(s, a, peaks):
    t, e, k, d, f = (s[x] for x in ("tokens", "experts", "top_k", "d", "f"))
    m = t * k
    rng = np.random.default_rng(0)
    experts = np.argsort(rng.random((t, e)), axis=1)[:, :k]  # k distinct experts per token, uniform
    group_sizes = jnp.asarray(np.bincount(experts.ravel(), minlength=e), jnp.int32)
    cases = []
    # --quick: the up projection alone (the down projection runs the same kernels, K and N swapped)
    for proj, (kk, nn) in (("up", (d, f)),) + ((("down", (f, d)),) if not a.quick else ()):
        ks = jax.random.split(jax.random.key(1), 4)
        lhs = jax.random.normal(ks[0], (m, kk), jnp.bfloat16)
        rhs = (jax.random.normal(ks[1], (e, kk, nn), jnp.float32) / np.sqrt(kk)).astype(jnp.bfloat16)
        w = (jax.random.normal(ks[2], (kk, nn), jnp.float32) / np.sqrt(kk)).astype(jnp.bfloat16)
        ct = jax.random.normal(ks[3], (m, nn), jnp.float32)
        # group_sizes is an argument, not a closed-over constant that XLA could fold the metadata of
        fns = {
            "ragged_dot": fwd_and_train(lambda x, r, gs: jax.lax.ragged_dot(
                x, r, gs, preferred_element_type=jnp.float32), (0, 1)),
            "pallas": fwd_and_train(lambda x, r, gs: gmm(x, r, gs), (0, 1)),
        }
        dense = fwd_and_train(lambda x, w, gs: jnp.dot(x, w, preferred_element_type=jnp.float32), (0, 1))
        flops = 2 * m * kk * nn
        for mode, idx, fl, by in (("fwd", 0, flops, nbytes(lhs, rhs) + 4 * m * nn),
                                  ("fwd+bwd", 1, 3 * flops, nbytes(lhs, rhs, ct, lhs, rhs))):
            args = (lhs, rhs, group_sizes, ct)
            ref = fns["ragged_dot"][idx](*args)
            errs = {"pallas": max_rel_err(fns["pallas"][idx](*args), ref)}
            run = {name: (fn[idx], args) for name, fn in fns.items()}
            run["dense_same_flops"] = (dense[idx], (lhs, w, group_sizes, ct))
            r = bench(run, a.repeats, a.warmup)
            for name in fns:
                r[name]["fraction_of_dense"] = r["dense_same_flops"]["ms"] / r[name]["ms"]
                r[name]["roofline"] = roofline(fl, by, r[name]["ms"], peaks)
            cases.append({"op": f"gmm_{proj}", "mode": mode, "shape": dict(s, m=m, k=kk, n=nn), "flops": fl,
                          "bytes": by, "group_sizes_min_max": [int(group_sizes.min()), int(group_sizes.max())],
                          "rel_err_vs_ragged_dot": errs, "results": r})
    return cases


def case_ffn(s, a, peaks):
    t, d, f = s["t"], s["d"], s["f"]
    ks = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(ks[0], (t, d), jnp.bfloat16)
    w_up = (jax.random.normal(ks[1], (d, f), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
    w_down = (jax.random.normal(ks[2], (f, d), jnp.float32) / np.sqrt(f)).astype(jnp.bfloat16)
    ct = jax.random.normal(ks[3], (t, d), jnp.float32)
    args = (x, w_up, w_down, ct)
    fns = {"xla": fwd_and_train(relu2_ffn, (0, 1, 2)), "pallas": fwd_and_train(fused_relu2_ffn, (0, 1, 2))}
    flops = 4 * t * d * f
    cases = []
    for mode, idx, fl, by in (("fwd", 0, flops, nbytes(x, w_up, w_down, x)),
                              ("fwd+bwd", 1, 3 * flops, nbytes(x, w_up, w_down, ct, x, w_up, w_down))):
        ref = fns["xla"][idx](*args)
        errs = {"pallas": max_rel_err(fns["pallas"][idx](*args), ref)}
        r = bench({name: (fn[idx], args) for name, fn in fns.items()}, a.repeats, a.warmup)
        for name in r:
            r[name]["roofline"] = roofline(fl, by, r[name]["ms"], peaks)
        cases.append({"op": "ffn", "mode": mode, "shape": s, "flops": fl, "bytes": by,
                      "rel_err_vs_xla": errs, "results": r})
    return cases


def case_e2e(s, a, peaks):
    import dataclasses

    from flax import nnx

    cases = []
    for preset, n_layers in s["models"].items():
        cfg = nj.presets.get(preset)
        cfg = dataclasses.replace(cfg, layers=cfg.layers[:n_layers] if n_layers else cfg.layers, mtp_depth=0,
                                  mtp_layers=(), vocab_size=s["vocab"] or cfg.vocab_size)
        models = {}
        for name, kernels in (("default", {}), ("pallas", dict(ssd="pallas", ffn="pallas", moe="pallas"))):
            models[name] = nj.HybridLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(s["dtype"]))
            nj.configure_kernels(models[name], **kernels)
        tokens = jax.random.randint(jax.random.key(1), (s["train_b"], s["train_l"]), 0, cfg.vocab_size)
        prompt = tokens[:1].repeat(s["decode_b"], 0)[:, :s["prompt"]]

        def train_fn(model):
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)

            def loss(params, tokens):
                logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1]).astype(jnp.float32)
                return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

            step = jax.jit(jax.value_and_grad(loss))
            return lambda tokens: step(params, tokens)

        def decode_fn(model):
            return lambda prompt: nj.generate(model, prompt, max_new_tokens=s["new_tokens"])

        for mode, make, args, work in (("train", train_fn, (tokens,), s["train_b"] * s["train_l"]),
                                       ("decode", decode_fn, (prompt,), s["decode_b"] * s["new_tokens"])):
            fns = {name: make(m) for name, m in models.items()}
            outs = {name: fn(*args) for name, fn in fns.items()}
            err = max_rel_err(outs["pallas"], outs["default"]) if mode == "train" else \
                float(np.mean(np.asarray(outs["pallas"]) == np.asarray(outs["default"])))
            r = bench({name: (fn, args) for name, fn in fns.items()}, a.repeats, a.warmup)
            for name in r:
                r[name]["tokens_per_s"] = work / (r[name]["ms"] / 1e3)
            key = "rel_err_vs_default" if mode == "train" else "tokens_equal_default"
            cases.append({"op": f"e2e_{preset}", "mode": mode, "shape": dict(s, models=None, layers=n_layers),
                          key: {"pallas": err}, "results": r})
    return cases


CASES = {"ssd": case_ssd, "gmm": case_gmm, "ffn": case_ffn, "ffn_narrow": case_ffn, "e2e": case_e2e}


def print_case(c):
    errs = c.get("rel_err_vs_xla", c.get("rel_err_vs_ragged_dot", c.get("rel_err_vs_default", {})))
    base = next(iter(c["results"]))
    for name, r in c["results"].items():
        roof = r.get("roofline")
        roof_s = f"  {100 * roof['fraction']:5.1f}% of roofline ({roof['binds']} binds)" if roof else ""
        dense_s = f"  {100 * r['fraction_of_dense']:5.1f}% of dense" if "fraction_of_dense" in r else ""
        err_s = f"  rel err {errs[name]:.1e}" if name in errs else ""
        print(f"{c['op']:>8} {c['mode']:>8} {name:>17} {r['ms']:10.3f} ms (iqr {100 * r['iqr_rel']:4.1f}%) "
              f"{r['vs_' + base]:7.3f}x vs {base}{dense_s}{roof_s}{err_s}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="ssd,gmm,ffn,ffn_narrow,e2e", help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--quick", action="store_true", help="tiny shapes, interpret mode on CPU (smoke run)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per function before timing")
    ap.add_argument("--mamba-ssm", default=None, help="path of a state-spaces/mamba checkout (git-ignored)")
    ap.add_argument("--out", default=None, help="JSON results; default experiments/benchmarks/results/"
                    "kernels.json (kernels_quick.json with --quick, so a smoke run never overwrites GPU numbers)")
    a = ap.parse_args()
    a.out = a.out or str(ROOT / "experiments/benchmarks/results" / ("kernels_quick.json" if a.quick else "kernels.json"))
    only = a.only.split(",")
    unknown = sorted(set(only) - set(CASES))
    if unknown:
        ap.error(f"--only: unknown {unknown}; allowed: {', '.join(CASES)}")
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not a.quick:
        ap.error(f"the Nemotron shapes need a GPU (backend here: {jax.default_backend()}); "
                 "use --quick for a smoke run")
    if a.quick:
        a.repeats, a.warmup = min(a.repeats, 3), 1
    device = jax.devices()[0]
    peak_name, peaks = device_peaks(device)
    print(f"jax {jax.__version__}, {device.platform}: {getattr(device, 'device_kind', device)}; "
          f"peaks: {peak_name or 'none known (no roofline)'}; median of {a.repeats} rounds")
    if not on_gpu:
        print("NOTE: not on a GPU, so every Pallas kernel runs in INTERPRET mode: these CPU timings measure the "
              "interpreter and mean nothing about kernel speed (smoke run only).")
    results = {"jax": jax.__version__, "backend": jax.default_backend(),
               "device": str(getattr(device, "device_kind", device)),
               "peaks_datasheet": peaks and {k: v for k, v in peaks.items() if k != "match"},
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
               "quick": a.quick, "repeats": a.repeats, "cases": []}
    if on_gpu:
        ceil = measure_ceilings(a.repeats)
        results["ceilings_measured"] = ceil
        print(f"measured ceilings: {ceil['hbm_bytes'] / 1e12:.2f} TB/s elementwise, "
              f"{ceil['bf16_flops'] / 1e12:.0f} TFLOP/s bf16 matmul")
    shapes = QUICK_SHAPES if a.quick else SHAPES
    for name in only:
        print(f"-- {name}: {shapes[name]}", flush=True)
        for c in CASES[name](shapes[name], a, peaks):
            if "ceilings_measured" in results and "flops" in c:
                for r in c["results"].values():
                    r["roofline_measured_ceilings"] = roofline(c["flops"], c["bytes"], r["ms"],
                                                               results["ceilings_measured"])
            results["cases"].append(c)
            print_case(c)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
