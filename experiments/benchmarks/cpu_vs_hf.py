"""CPU throughput: nemojax vs HF transformers' NemotronH (PyTorch), same weights, one process.

    python experiments/benchmarks/cpu_vs_hf.py [--models dense,moe] [--routers balanced,initial] [--hidden 512]
                                               [--repeats 7] [--quick] [--out PATH]

For each model (a dense hybrid "M-M-M*-M-" and a Nano-like MoE "MEM*EME", width --hidden,
Mamba heads of 64, state 64, vocab 4096, fp32, the MoE on nemojax's default implementation): build a random
checkpoint with transformers, save it, `nj.load_pretrained` it, check the logits agree, then time

  * a training step (forward + backward + AdamW) on [batch, seq] tokens: nemojax = one jitted
    value_and_grad of next-token cross entropy + optax.adamw; HF = forward with labels, backward,
    torch.optim.AdamW.step;
  * greedy decoding: nj.generate(temperature=0) vs HF generate(do_sample=False, use_cache=True),
    both including the prefill of the prompt.

The MoE model runs once per router state (`--routers`): "balanced", the routers' correction
biases set as aux-loss-free training leaves them (`balance_routers`), and "initial", as the random
initialisation routes (the busiest expert gets 3-4x the mean load); the busiest / mean load of
every MoE layer is recorded.

Goals (issue 12): training step at least 1.0x HF at width 512 and 1.2x at 256; greedy decode at
least 4x at 512 and 5x at 256.

Repeats interleave the two frameworks; each ratio is the median of per-pair ratios (HF time /
nemojax time), which cancels most of the noise from other processes on a shared machine. Process
CPU time (all threads) is reported beside wall time. torch waits passively (OMP_WAIT_POLICY).

Roofline: every weight matmul of the training step (forward, input-gradient and weight-gradient
shapes) is timed as a plain fp32 GEMM in each framework; attention scores/values and the SSD
chunk contractions (counted with the formulation's FLOPs, per group for C.B) are added at that
framework's mean GEMM rate. roofline_time / step_time is the fraction each framework reaches, in
wall time and in process CPU time (which other processes on a shared machine disturb less).
Decode: one step streams every weight but the input embedding (all experts: at batch 4 x top-4 of
16 most are used), so weight bytes / DRAM read bandwidth (a jitted sum over 256 MB) bounds a step
from below when the weights exceed the cache; step floor / step time is the fraction reached.
Results go to experiments/benchmarks/results/cpu_vs_hf_h{hidden}.json (--out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch's OpenMP workers spin at barriers by default; on a shared 2-core machine a descheduled
# worker then stalls the other and the HF step runs ~3x slower than with passive waiting (measured
# under load 9). Passive waiting is the stronger baseline; export OMP_WAIT_POLICY=ACTIVE to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

import nemojax as nj  # noqa: E402
from nemojax.nn.ffn import MoE, configure_moe, pop_moe_stats, update_correction_biases  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import make_golden  # noqa: E402  (random-weight HF models at scales where every layer matters)



def model_configs(hidden: int) -> dict[str, dict]:
    """HF configs at width `hidden`: Mamba d_inner = 2 * hidden in heads of 64, attention heads of 64."""
    common = dict(
        vocab_size=4096, hidden_size=hidden, num_attention_heads=hidden // 64, num_key_value_heads=2, head_dim=64,
        mamba_num_heads=2 * hidden // 64, mamba_head_dim=64, n_groups=2, ssm_state_size=64, conv_kernel=4,
        chunk_size=128, layer_norm_epsilon=1e-5, tie_word_embeddings=False, time_step_min=1e-9,
    )
    return {
        "dense": dict(common, hybrid_override_pattern="M-M-M*-M-", intermediate_size=3 * hidden),
        "moe": dict(common, hybrid_override_pattern="MEM*EME", n_routed_experts=16, num_experts_per_tok=4,
                    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                    moe_intermediate_size=3 * hidden // 4, moe_shared_expert_intermediate_size=3 * hidden // 2),
    }


MODELS = model_configs(512)
LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.01
GOALS = {512: {"train": 1.0, "decode": 4.0}, 256: {"train": 1.2, "decode": 5.0}}  # min HF time / nemojax time


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def interleaved(fns: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run each fn once per repeat, in alternating order: (wall seconds, process CPU seconds) per call.
    CPU seconds (all threads) do not count time spent descheduled, so they stay comparable when
    other processes load the machine."""
    names = list(fns)
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            c = time.process_time()
            wall[n].append(timed(fns[n])[0])
            cpu[n].append(time.process_time() - c)
    return wall, cpu


def summary(times: tuple[dict, dict], work: float) -> dict:
    (wall, cpu) = times
    hf, nj_ = np.array(wall["hf"]), np.array(wall["nemojax"])
    hf_cpu, nj_cpu = np.array(cpu["hf"]), np.array(cpu["nemojax"])
    return {
        "hf_s": float(np.median(hf)), "nemojax_s": float(np.median(nj_)),
        "hf_tok_per_s": work / float(np.median(hf)), "nemojax_tok_per_s": work / float(np.median(nj_)),
        "ratio": float(np.median(hf / nj_)), "ratio_min_max": [float(np.min(hf / nj_)), float(np.max(hf / nj_))],
        "hf_cpu_s": float(np.median(hf_cpu)), "nemojax_cpu_s": float(np.median(nj_cpu)),
        "cpu_ratio": float(np.median(hf_cpu / nj_cpu)),
        "hf_all_s": hf.tolist(), "nemojax_all_s": nj_.tolist(),
    }


# ----------------------------------------------------------------------------- matmul accounting
def weight_gemms(hf_cfg: dict, tokens: int) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N) of every weight matmul in one forward pass; routed experts as one GEMM of the
    routed token copies (the ideal grouped matmul)."""
    d, out = hf_cfg["hidden_size"], []
    for sym in hf_cfg["hybrid_override_pattern"]:
        if sym == "M":
            h, p = hf_cfg["mamba_num_heads"], hf_cfg["mamba_head_dim"]
            gn = hf_cfg["n_groups"] * hf_cfg["ssm_state_size"]
            out += [("mamba.in_proj", tokens, d, 2 * h * p + 2 * gn + h), ("mamba.out_proj", tokens, h * p, d)]
        elif sym == "-":
            f = hf_cfg["intermediate_size"]
            out += [("mlp.up", tokens, d, f), ("mlp.down", tokens, f, d)]
        elif sym == "*":
            q = hf_cfg["num_attention_heads"] * hf_cfg["head_dim"]
            kv = hf_cfg["num_key_value_heads"] * hf_cfg["head_dim"]
            out += [("attn.q", tokens, d, q), ("attn.kv", tokens, d, 2 * kv), ("attn.o", tokens, q, d)]
        elif sym == "E":
            f, fs = hf_cfg["moe_intermediate_size"], hf_cfg["moe_shared_expert_intermediate_size"]
            k = hf_cfg["num_experts_per_tok"]
            out += [("moe.router", tokens, d, hf_cfg["n_routed_experts"]), ("moe.experts.up", tokens * k, d, f),
                    ("moe.experts.down", tokens * k, f, d), ("moe.shared.up", tokens, d, fs),
                    ("moe.shared.down", tokens, fs, d)]
    return out + [("lm_head", tokens, d, hf_cfg["vocab_size"])]


def mixing_flops(hf_cfg: dict, batch: int, seq: int) -> float:
    """Forward FLOPs of the matmuls between activations: attention q.k and p.v over the full L x L
    square (both frameworks compute it before masking), and the SSD chunked contractions."""
    flops = 0.0
    for sym in hf_cfg["hybrid_override_pattern"]:
        if sym == "*":
            flops += 2 * 2 * batch * hf_cfg["num_attention_heads"] * seq * seq * hf_cfg["head_dim"]
        elif sym == "M":
            h, p, g, n = (hf_cfg[k] for k in ("mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size"))
            q = min(hf_cfg["chunk_size"], seq)
            # C.B per group, intra-chunk y, chunk states, state -> output
            flops += 2 * batch * seq * (q * g * n + q * h * p + 2 * h * p * n)
    return flops


def gemm_seconds(m: int, k: int, n: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU seconds, per framework, of x[m,k] @ w[k,n] plus the two backward
    GEMMs (dx = dy w^T, dw = x^T dy); jax and torch alternate so both see the same machine load."""
    rng = np.random.default_rng(0)
    x, w, dy = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (k, n), (m, n)))
    jx, jw, jdy = jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)
    f = jax.jit(lambda x, w, dy: (x @ w, dy @ w.T, x.T @ dy))
    tx, tw, tdy = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(dy)
    runs = {"jax": lambda: jax.block_until_ready(f(jx, jw, jdy)), "torch": lambda: (tx @ tw, tdy @ tw.T, tx.T @ tdy)}
    for run in runs.values():
        run()
    times = {fw: {"wall": [], "cpu": []} for fw in runs}
    for i in range(repeats):
        for fw in (("jax", "torch") if i % 2 == 0 else ("torch", "jax")):
            c = time.process_time()
            times[fw]["wall"].append(timed(runs[fw])[0])
            times[fw]["cpu"].append(time.process_time() - c)
    return {fw: {clock: float(np.median(t)) for clock, t in ts.items()} for fw, ts in times.items()}


def roofline(hf_cfg: dict, batch: int, seq: int, repeats: int) -> dict:
    gemms = weight_gemms(hf_cfg, batch * seq)
    weight_flops = 3 * sum(2 * m * k * n for _, m, k, n in gemms)  # forward + two backward GEMMs
    extra_flops = 3 * mixing_flops(hf_cfg, batch, seq)
    res = {"weight_gemm_flops": weight_flops, "mixing_flops": extra_flops,
           "gemms": [dict(name=g, m=m, k=k, n=n) for g, m, k, n in gemms]}
    per_shape = {s: gemm_seconds(*s, repeats) for s in sorted({(m, k, n) for _, m, k, n in gemms})}
    for fw in ("jax", "torch"):
        res[fw] = {}
        for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
            t_weights = sum(per_shape[(m, k, n)][fw][clock] for _, m, k, n in gemms)
            rate = weight_flops / t_weights
            res[fw].update({f"gemm_gflops{suffix}": rate / 1e9, f"roofline{suffix}_s": t_weights + extra_flops / rate})
        res[fw]["per_shape_gflops"] = {f"{m}x{k}x{n}": 3 * 2 * m * k * n / t[fw]["wall"] / 1e9
                                       for (m, k, n), t in per_shape.items()}
    return res


def stream_gbps(repeats: int, nbytes: int = 256 << 20) -> float:
    """DRAM read bandwidth: a jitted sum over an array 8x larger than the L3 cache."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    jax.block_until_ready(f(a))
    return nbytes / 1e9 / float(np.median([timed(lambda: jax.block_until_ready(f(a)))[0] for _ in range(repeats)]))


def decode_weight_bytes(hf) -> int:
    """Bytes of weights one decode step reads: all but the input embedding table (a row gather)."""
    emb = hf.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in hf.parameters()) - emb.numel() * emb.element_size()


# ------------------------------------------------------------------------------------- models
def build_pair(name: str, workdir: Path, balance_tokens=None):
    """The random HF model and its nemojax load. With `balance_tokens`, the routers' correction
    biases are set as aux-loss-free training leaves them: loads balanced on those tokens."""
    make_golden.CONFIGS[f"bench_{name}"] = MODELS[name]
    hf = make_golden.build_hf_model(f"bench_{name}", seed=0)
    path = workdir / name
    hf.save_pretrained(path)
    model = nj.load_pretrained(path, progress=False)
    if balance_tokens is not None and any(c == "E" for c in MODELS[name]["hybrid_override_pattern"]):
        balance_routers(model, hf, balance_tokens)
    return hf, model


def balance_routers(model, hf, tokens, rounds: int = 60) -> None:
    """The correction-bias update of training (bias += rate * sign(mean load - load)), applied for
    `rounds` forward passes over `tokens` with a decaying rate, then copied into the HF model, so
    that both run a router as balanced as a trained Nemotron's (random HF weights route 3-4x the
    mean load to the busiest expert)."""
    configure_moe(model, collect_stats=True)
    forward = nnx.jit(lambda m, t: m(t))
    for r in range(rounds):
        forward(model, tokens)
        update_correction_biases(model, pop_moe_stats(model), rate=0.1 * 0.93 ** r)
    configure_moe(model, collect_stats=False)
    with torch.no_grad():
        for path, m in nnx.iter_modules(model):
            if isinstance(m, MoE):
                layer = hf.model.layers[int(path[1])].mixer.gate
                layer.e_score_correction_bias.copy_(torch.tensor(np.asarray(m.correction_bias[...])))


def router_load(model, tokens) -> dict[str, float]:
    """Busiest / mean expert load of each MoE layer on `tokens` (a forward with stats collected)."""
    configure_moe(model, collect_stats=True)
    nnx.jit(lambda m, t: m(t))(model, tokens)
    stats = pop_moe_stats(model)
    configure_moe(model, collect_stats=False)
    return {path: float(jnp.max(s["counts"]) / jnp.mean(s["counts"])) for path, s in stats.items()}


def hf_param_count(hf) -> int:
    return sum(p.numel() for p in hf.parameters())


def nemojax_train_step(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)

    def loss_fn(params, rest, tokens):
        # labels shifted left and the last position masked, as transformers' causal-LM loss does:
        # slicing the [B, L, V] logits instead costs a copy forward and a padded copy backward.
        logits = nnx.merge(graphdef, params, rest)(tokens)
        labels = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
        valid = jnp.arange(tokens.shape[1]) < tokens.shape[1] - 1
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(jnp.where(valid, ce, 0.0)) / (tokens.shape[0] * (tokens.shape[1] - 1))

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rest, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = {"params": params, "opt": tx.init(params)}

    def run(tokens):
        state["params"], state["opt"], loss = step(state["params"], state["opt"], rest, tokens)
        return float(jax.block_until_ready(loss))

    return run


def hf_train_step(hf):
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    def run(tokens):
        loss = hf(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return run


def bench_model(name: str, router: str | None, args, workdir: Path) -> dict:
    """One model (`router`: the MoE routers' state, None for a dense model) timed against HF."""
    hf_cfg = MODELS[name]
    b, l, p, n_new = args.batch, args.seq, args.prompt, args.new_tokens
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, hf_cfg["vocab_size"], (b, l)).astype(np.int32)
    hf, model = build_pair(name, workdir, jnp.asarray(tokens) if router == "balanced" else None)
    t_tokens = torch.as_tensor(tokens, dtype=torch.long)
    j_tokens = jnp.asarray(tokens)
    name = name if router is None else f"{name}-{router}"
    load = router_load(model, j_tokens) if router else {}

    with torch.no_grad():
        ref = hf(t_tokens).logits.float().numpy()
    logits_err = rel_err(model(j_tokens), ref)
    print(f"[{name}] params {hf_param_count(hf) / 1e6:.2f}M, logits rel err {logits_err:.2e}, busiest / mean "
          f"expert load {', '.join(f'{v:.2f}' for v in load.values()) or '-'}", flush=True)
    assert logits_err < 1e-3, f"{name}: nemojax and HF logits disagree (rel err {logits_err:.2e})"

    # ------------------------------------------------------------------ greedy decode (eval mode)
    prompt = tokens[:, :p]
    t_prompt = torch.as_tensor(prompt, dtype=torch.long)
    j_prompt = jnp.asarray(prompt)

    def hf_generate():
        with torch.no_grad():
            return hf.generate(t_prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                               use_cache=True, eos_token_id=None, pad_token_id=0).numpy()

    def nj_generate():
        return np.asarray(jax.block_until_ready(nj.generate(model, j_prompt, max_new_tokens=n_new, temperature=0.0)))

    gen_compile_s, nj_out = timed(nj_generate)
    hf_out = hf_generate()
    new_equal = float(np.mean(hf_out[:, p:] == nj_out[:, p:]))
    same_first = int(np.min([np.argmax(np.append(h != j, True)) for h, j in zip(hf_out[:, p:], nj_out[:, p:])]))
    decode = summary(interleaved({"hf": hf_generate, "nemojax": nj_generate}, args.repeats), b * n_new)
    decode.update(compile_s=gen_compile_s, greedy_tokens_equal=new_equal, greedy_first_mismatch=same_first)
    # Each decode step streams the weights once: at batch b the step is bandwidth-bound when they
    # exceed the last-level cache. Lower bound on a step = weight bytes / DRAM read bandwidth.
    gbps = stream_gbps(args.gemm_repeats)
    step_floor_s = decode_weight_bytes(hf) / 1e9 / gbps
    decode_steps = n_new  # prefill included in both timings; it is small next to n_new steps
    decode.update(weight_mbytes=decode_weight_bytes(hf) / 1e6, stream_gbps=gbps, step_floor_s=step_floor_s,
                  bandwidth_fraction_nemojax=step_floor_s * decode_steps / decode["nemojax_s"],
                  bandwidth_fraction_hf=step_floor_s * decode_steps / decode["hf_s"])
    print(f"[{name}] decode: HF {decode['hf_tok_per_s']:.0f} tok/s, nemojax {decode['nemojax_tok_per_s']:.0f} "
          f"tok/s, ratio {decode['ratio']:.2f}x, CPU-time ratio {decode['cpu_ratio']:.2f}x "
          f"(greedy tokens equal {new_equal:.3f}); "
          f"weights {decode['weight_mbytes']:.0f} MB "
          f"per step at {gbps:.1f} GB/s -> bandwidth fraction nemojax {decode['bandwidth_fraction_nemojax']:.2f}, "
          f"HF {decode['bandwidth_fraction_hf']:.2f}", flush=True)

    # ------------------------------------------------------------------------- training step
    nj_step, hf_step = nemojax_train_step(model), hf_train_step(hf)
    train_compile_s, nj_loss0 = timed(lambda: nj_step(j_tokens))
    hf_loss0 = hf_step(t_tokens)
    print(f"[{name}] first-step loss: HF {hf_loss0:.5f}, nemojax {nj_loss0:.5f}", flush=True)
    assert abs(hf_loss0 - nj_loss0) < 1e-3 * abs(hf_loss0), f"{name}: losses disagree"
    train = summary(interleaved({"hf": lambda: hf_step(t_tokens), "nemojax": lambda: nj_step(j_tokens)},
                                args.repeats), b * l)
    train.update(compile_s=train_compile_s, first_loss_hf=hf_loss0, first_loss_nemojax=nj_loss0)
    roof = roofline(hf_cfg, b, l, args.gemm_repeats)
    for fw, key in (("jax", "nemojax"), ("torch", "hf")):
        roof[fw]["fraction"] = roof[fw]["roofline_s"] / train[f"{key}_s"]
        roof[fw]["fraction_cpu"] = roof[fw]["roofline_cpu_s"] / train[f"{key}_cpu_s"]
    best = min(roof["jax"]["roofline_s"], roof["torch"]["roofline_s"])
    roof["best_roofline_s"] = best
    roof["ratio_cap"] = train["hf_s"] / best
    train["roofline"] = roof
    print(f"[{name}] train: HF {train['hf_tok_per_s']:.0f} tok/s, nemojax {train['nemojax_tok_per_s']:.0f} tok/s, "
          f"ratio {train['ratio']:.2f}x, CPU-time ratio {train['cpu_ratio']:.2f}x; roofline fraction (wall; CPU time) "
          f"nemojax {roof['jax']['fraction']:.2f}; {roof['jax']['fraction_cpu']:.2f} "
          f"(GEMM {roof['jax']['gemm_gflops']:.0f} GFLOP/s), HF {roof['torch']['fraction']:.2f}; "
          f"{roof['torch']['fraction_cpu']:.2f} "
          f"(GEMM {roof['torch']['gemm_gflops']:.0f} GFLOP/s)", flush=True)
    return {"hf_config": hf_cfg, "router": router, "busiest_over_mean_load": load, "params": hf_param_count(hf),
            "logits_rel_err": logits_err, "load_avg_after": os.getloadavg(),
            "batch": b, "seq": l, "prompt": p, "new_tokens": n_new, "train": train, "decode": decode}


def table(results: dict, hidden: int) -> str:
    """The markdown table RESULTS.md holds (tests/test_claims.py renders the same from the JSON)."""
    rows = ["| model (busiest / mean expert load) | metric | HF tok/s | nemojax tok/s | wall ratio (goal) | "
            "pair-ratio range | CPU-time ratio | roofline fraction nemojax / HF, wall (CPU time) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        load = r.get("busiest_over_mean_load") or {}
        label = f"{name} ({min(load.values()):.2f}-{max(load.values()):.2f})" if load else name
        for metric in ("train", "decode"):
            m = r[metric]
            lo, hi = m["ratio_min_max"]
            if metric == "train":
                f = m["roofline"]
                frac = (f"{f['jax']['fraction']:.2f} / {f['torch']['fraction']:.2f} "
                        f"({f['jax']['fraction_cpu']:.2f} / {f['torch']['fraction_cpu']:.2f})")
            else:
                frac = f"{m['bandwidth_fraction_nemojax']:.2f} / {m['bandwidth_fraction_hf']:.2f}"
            rows.append(f"| {label} | {metric} | {m['hf_tok_per_s']:.0f} | {m['nemojax_tok_per_s']:.0f} | "
                        f"{m['ratio']:.2f}x ({GOALS[hidden][metric]}x) | {lo:.2f}-{hi:.2f} | {m['cpu_ratio']:.2f}x | "
                        f"{frac} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--gemm-repeats", type=int, default=7)
    ap.add_argument("--routers", default="balanced,initial",
                    help="MoE router states to run: balanced (as training leaves them) and/or initial (random init)")
    ap.add_argument("--quick", action="store_true", help="3 repeats, for a smoke run")
    ap.add_argument("--out", default=None, help="default: experiments/benchmarks/results/cpu_vs_hf_h{hidden}.json")
    args = ap.parse_args()
    routers = args.routers.split(",")
    if not set(routers) <= {"balanced", "initial"} or args.hidden not in GOALS:
        ap.error(f"--routers takes balanced and/or initial, --hidden one of {tuple(GOALS)}; "
                 f"got {args.routers!r}, {args.hidden}")
    args.out = args.out or str(ROOT / "experiments" / "benchmarks" / "results" / f"cpu_vs_hf_h{args.hidden}.json")
    MODELS.update(model_configs(args.hidden))
    if args.quick:
        args.repeats = args.gemm_repeats = 3
    cores = os.cpu_count()
    torch.set_num_threads(cores)
    env = {"machine": f"{cores}-core CPU ({platform.processor() or platform.machine()})",
           "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "date": datetime.date.today().isoformat(), "load_avg_at_start": os.getloadavg(),
           "torch_threads": torch.get_num_threads(), "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}
    print(env, flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            moe = any(c == "E" for c in MODELS[name]["hybrid_override_pattern"])
            for router in (routers if moe else [None]):
                r = bench_model(name, router, args, Path(d))
                results[name if router is None else f"{name}-{router}"] = r
    env["load_avg_at_end"] = os.getloadavg()
    print(table(results, args.hidden))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "args": vars(args), "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
