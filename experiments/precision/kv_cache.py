"""FP8 KV cache on a trained model (issue 15): the trained Puzzle parent (fp32, attention at layers 2
and 8) generating with its K and V cached in float32 (the reference), bfloat16, FP8 E4M3 with
per-layer scales calibrated on training text (amax / 448) and FP8 with scales of 1.

Per cache, on held-out text only:
  loss        held-out cross-entropy through the cache: each window's first --prefill tokens in one
              cached forward, the rest decoded one token at a time on the true tokens (teacher forcing),
              every attention read coming back out of the cache; accuracy, and the KL of the reference's
              next-token distribution to this cache's, per token
  greedy      --prompts held-out prompts of --prompt-len tokens continued greedily by --new-tokens with
              `nj.generate(..., kv_cache_dtype=...)`: tokens equal to the reference's at the same
              position, prompts continued identically, tokens before the first difference
  memory      bytes of the attention layers' K/V cache (and of the whole cache: Mamba states are fixed
              size) for the generation's batch and length, and per token
  quantisation  each attention layer's K and V on the first --range-batches held-out batches, as the
              fp32 cache holds them, encoded and decoded with each scale: relative RMS error, the fraction
              of entries below E4M3's smallest normal (2^-6, fewer significant bits) and clipped at 448,
              and the held-out amax against the calibrated one
  range       why the two FP8 caches differ (or not): the same model with every attention layer's K and V
              multiplied by 2^e and its Q and output projections by 2^-e (scores and outputs unchanged,
              exactly: powers of two), for e in --range-exponents: held-out loss (first
              --range-batches batches) of the fp32 cache and of both FP8 caches. A calibrated scale
              follows K and V, so its codes do not change; scale 1 sees K and V underflow or clip.
Calibration: the first --calibration-batches batches of the training split. Writes results/kv_cache.json.

    python experiments/precision/kv_cache.py [--parent RUN] [--heldout-batches 8] [--calibration-batches 4]
                                             [--prefill 128] [--prompts 128] [--prompt-len 64] [--new-tokens 128]
                                             [--range-exponents -12 -8 0 8] [--range-batches 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nemojax as nj
from nemojax.compress.puzzle.pipeline import calibration_tokens, heldout_batches
from nemojax.nn.attention import kv_cache_layers, layer_cache
from nemojax.quant import decode_fp8, encode_fp8
from nemojax.quant.kv_cache import calibrate_kv_scales, kv_amax, set_kv_scales
from nemojax.train.loop import load_run
from nemojax.train.losses import cross_entropy, kd_kl

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REFERENCE = "float32"
CACHES = (REFERENCE, "bfloat16", "fp8", "fp8_uncalibrated")
E4M3_MIN_NORMAL, E4M3_MAX = 2.0 ** -6, 448.0


@partial(nnx.jit, static_argnames=("kv_cache_dtype", "prefill"))
def cached_logits(model, tokens, *, kv_cache_dtype, prefill):
    """Logits [B, T, V] of `tokens`: the first `prefill` in one cached forward, then one decode step per token."""
    b, t = tokens.shape
    cache = model.init_cache(b, t, kv_cache_dtype=kv_cache_dtype)
    first, cache = model.forward(tokens[:, :prefill], cache)

    def step(cache, tok):
        logits, cache = model.forward(tok[:, None], cache)
        return cache, logits[:, 0]

    _, rest = jax.lax.scan(step, cache, tokens[:, prefill:].T)
    return jnp.concatenate([first, rest.swapaxes(0, 1)], axis=1)


@nnx.jit
def plain_kv(model, tokens):
    """Each attention layer's K and V [B, Hkv, T, Dh] as an fp32 cache holds them (the exact activations)."""
    _, cache = model.forward(tokens, model.init_cache(*tokens.shape, kv_cache_dtype=REFERENCE))
    return {name: {t: layer_cache(cache["layers"], index)[t] for t in ("k", "v")}
            for name, (index, _) in kv_cache_layers(model).items()}


def heldout_loss(model, heldout, kv_cache_dtype, ref_logits, prefill: int) -> dict:
    """Cross-entropy, accuracy and KL(reference || this cache) per token over the held-out batches."""
    t0, (ce, correct, kl, n) = time.time(), np.zeros(4)
    for h, ref in zip(heldout, ref_logits):
        x = cached_logits(model, jnp.asarray(h["inputs"]), kv_cache_dtype=kv_cache_dtype, prefill=prefill)
        targets = jnp.asarray(h["targets"])
        c, count = cross_entropy(x, targets)
        ce, correct = ce + float(c) * int(count), correct + float(jnp.sum(jnp.argmax(x, -1) == targets))
        kl, n = kl + float(kd_kl(x, ref)) * int(count), n + int(count)
    print(f"{kv_cache_dtype:>17}: held-out loss {ce / n:.6f}, KL to {REFERENCE} {kl / n:.2e} "
          f"({time.time() - t0:.0f} s)")
    return {"loss": ce / n, "accuracy": correct / n, "kl_to_reference": kl / n, "tokens": int(n),
            "seconds": time.time() - t0}


def kv_rescaled(model, factor: float):
    """A copy of `model` with every attention layer's K and V times `factor` and Q and the output
    projection divided by it: the same function (exactly, for a power of two), K and V in another range."""
    copy = nnx.clone(model)  # its own Variables: a split-merge copy would share them with `model`
    for _, m in kv_cache_layers(copy).values():
        for proj, f in ((m.q_proj, 1 / factor), (m.k_proj, factor), (m.v_proj, factor), (m.o_proj, 1 / factor)):
            proj.kernel[...] = proj.kernel[...] * f
    return copy


def quantisation_stats(x, scale: float) -> dict:
    y = np.asarray(x, np.float32) / np.float32(scale)  # in E4M3's units, as the codes see it
    back = np.asarray(decode_fp8(encode_fp8(jnp.asarray(x), scale), scale))
    x = np.asarray(x, np.float64)
    return {"rel_rms_error": float(np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2))),
            "below_min_normal": float(np.mean((np.abs(y) < E4M3_MIN_NORMAL) & (y != 0))),
            "clipped": float(np.mean(np.abs(y) > E4M3_MAX))}


def cache_bytes(model, batch: int, length: int, kv_cache_dtype) -> dict:
    shapes = jax.eval_shape(lambda: model.init_cache(batch, length, kv_cache_dtype=kv_cache_dtype))
    nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))  # noqa: E731
    kv = sum(nbytes(layer_cache(shapes["layers"], index)) for index, _ in kv_cache_layers(model).values())
    return {"attention_kv": kv, "total": nbytes(shapes)}


def greedy_agreement(out, ref) -> dict:
    same = np.asarray(out) == np.asarray(ref)
    first_diff = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return {"token_agreement": float(same.mean()), "identical_prompts": float(same.all(axis=1).mean()),
            "mean_tokens_before_first_difference": float(first_diff.mean())}


def run(args) -> dict:
    start = time.time()
    tc, model, _ = load_run(args.parent)
    heldout = heldout_batches(tc, args.heldout_batches)
    b, window = tc.batch_size, tc.seq_len
    if args.prompts > b * args.heldout_batches or args.prompt_len >= window or args.prefill >= window:
        raise SystemExit(f"--prompts must be <= {b * args.heldout_batches} (the held-out windows), --prompt-len and "
                         f"--prefill < {window} (their length)")
    cal = calibration_tokens(tc, args.calibration_batches)
    cal_batches = [cal[i:i + b] for i in range(0, len(cal), b)]
    scales = calibrate_kv_scales(model, cal_batches)
    set_kv_scales(model, scales)
    cal_amax = kv_amax(model, cal_batches)
    held_amax = kv_amax(model, [h["inputs"] for h in heldout])
    print(f"calibrated on {cal.size} training tokens: {scales}")

    ref_logits = [cached_logits(model, jnp.asarray(h["inputs"]), kv_cache_dtype=REFERENCE, prefill=args.prefill)
                  for h in heldout]
    loss = {kv: heldout_loss(model, heldout, kv, ref_logits, args.prefill) for kv in CACHES}

    prompts = np.concatenate([h["inputs"] for h in heldout])[:args.prompts, :args.prompt_len]
    outputs = {kv: np.asarray(nj.generate(model, prompts, args.new_tokens, kv_cache_dtype=kv))[:, args.prompt_len:]
               for kv in CACHES}
    greedy = {kv: {"vs_" + ref: greedy_agreement(outputs[kv], outputs[ref]) for ref in (REFERENCE, "bfloat16")}
              for kv in CACHES}

    memory = {kv: {"generation": cache_bytes(model, args.prompts, args.prompt_len + args.new_tokens, kv),
                   "per_token": cache_bytes(model, 1, 1, kv)["attention_kv"]}
              for kv in CACHES}
    for kv in CACHES:  # a cache's two fp32 scales per layer are not per token
        memory[kv]["per_token"] -= 8 * len(scales) if kv.startswith("fp8") else 0

    acts = [plain_kv(model, jnp.asarray(h["inputs"])) for h in heldout[:args.range_batches]]
    quant = {}
    for name in scales:
        quant[name] = {}
        for j, t in enumerate(("k", "v")):
            x = np.concatenate([np.asarray(a[name][t]).ravel() for a in acts])
            quant[name][t] = {"scale": scales[name][j], "calibration_amax": cal_amax[name][j],
                              "heldout_amax": held_amax[name][j],
                              "fp8": quantisation_stats(x, scales[name][j]),
                              "fp8_uncalibrated": quantisation_stats(x, 1.0)}

    ranges = []
    for e in args.range_exponents:
        shifted = kv_rescaled(model, 2.0 ** e)
        set_kv_scales(shifted, calibrate_kv_scales(shifted, cal_batches))
        ranges.append({"exponent": e, "kv_amax": kv_amax(shifted, [h["inputs"] for h in heldout[:args.range_batches]]),
                       **{kv: heldout_loss(shifted, heldout[:args.range_batches], kv, ref_logits, args.prefill)
                          for kv in (REFERENCE, "fp8", "fp8_uncalibrated")}})

    return {
        "meta": {"parent": os.path.relpath(args.parent.resolve(), ROOT), "pattern": model.cfg.pattern,
                 "model_dtype": str(model.dtype),
                 "attention_layers": sorted(scales), "caches": list(CACHES), "reference": REFERENCE,
                 "heldout_batches": args.heldout_batches, "heldout_tokens": loss[REFERENCE]["tokens"],
                 "window": window, "prefill": args.prefill,
                 "calibration_batches": args.calibration_batches, "calibration_tokens": int(cal.size),
                 "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                 "range_exponents": args.range_exponents, "range_batches": args.range_batches,
                 "seconds": time.time() - start, "date": datetime.date.today().isoformat(), "jax": jax.__version__,
                 "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                 "command": " ".join(["python experiments/precision/kv_cache.py", *sys.argv[1:]])},
        "scales": {name: {"k_scale": k, "v_scale": v} for name, (k, v) in scales.items()},
        "loss": loss,
        "greedy": greedy,
        "memory": memory,
        "quantisation": quant,
        "range": ranges,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", type=Path, default=HERE.parent / "puzzle" / "runs" / "parent")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--heldout-batches", type=int, default=8, help="held-out batches the loss is measured on")
    p.add_argument("--calibration-batches", type=int, default=4, help="training batches the scales come from")
    p.add_argument("--prefill", type=int, default=128, help="tokens of each held-out window in the cached prefill")
    p.add_argument("--prompts", type=int, default=128, help="held-out prompts for greedy generation")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per prompt")
    p.add_argument("--range-exponents", type=int, nargs="*", default=[-12, -8, 0, 8],
                   help="e of the 2^e rescalings of K and V (an equivalent model) for the range check")
    p.add_argument("--range-batches", type=int, default=2,
                   help="held-out batches of the range check and of the quantisation statistics")
    args = p.parse_args(argv)
    if args.range_batches > args.heldout_batches:
        p.error("--range-batches must be <= --heldout-batches")
    for name in ("heldout_batches", "calibration_batches", "prefill", "prompts", "prompt_len", "new_tokens",
                 "range_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    result = run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "kv_cache.json").write_text(json.dumps(result, indent=1) + "\n")
    for kv in CACHES:
        g = result["greedy"][kv]["vs_" + REFERENCE]
        print(f"{kv:>17}: loss {result['loss'][kv]['loss']:.5f}, greedy agreement {g['token_agreement']:.3f}, "
              f"K/V bytes {result['memory'][kv]['generation']['attention_kv']}")
    print(f"{result['meta']['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
