"""MTP speculative decoding on a model trained with the MTP loss (issue 15).

Stages (each skipped on a re-run once done; --redo STAGE runs it again):
  train       a hybrid model (`M-M*-M-`, width 192) with two MTP depths (`*-` each) trained with the MTP
              loss on the standard library's source (`--data stdlib`): `nemojax.train.train`, resumable,
              in runs/speculative (git-ignored)
  acceptance  held-out prompts (whole held-out files, never trained on) continued greedily by plain and by
              speculative decoding for every draft length k: the outputs token for token, the acceptance
              rate, drafts kept per step and, per draft position, the rate at which it is accepted; then
              the same with sampling at a temperature
  throughput  decode tokens/s of speculative against plain greedy decoding, both compiled and warmed up,
              timed in turns in this process (repeats interleaved: plain, k=1, ..., plain, k=1, ...), each
              also with one new token (the prefill), whose time is subtracted
  profile     where a speculative step's time goes: each piece of the step (a one-token forward, a
              (k+1)-token verification forward, an MTP depth over m tokens, the LM head) timed alone in a
              compiled loop on the trained model's caches, and the step cost they add up to
Writes results/speculative.json and results/speculative.png.

    python experiments/precision/speculative.py [--redo STAGE] [--prompts 32] [--prompt-len 64] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nemojax as nj
from nemojax.generate import _generate
from nemojax.config import AttentionSpec, MambaSpec, MLPSpec, ModelConfig, from_pattern
from nemojax.nn.ffn import inference_copy
from nemojax.speculative import _rolls_back_by_position, speculative_generate
from nemojax.train import TrainConfig, train
from nemojax.train.loop import load_run, make_dataset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUN = HERE / "runs" / "speculative"
RESULTS = HERE / "results" / "speculative.json"
STAGES = ("train", "acceptance", "throughput", "profile")
RECIPE = dict(data="stdlib", seq_len=256, batch_size=16, steps=400, lr=3e-3, mtp_lambda=0.3, eval_every=100,
              eval_batches=8, save_every=50, log_every=10, sample_tokens=0)


def mtp_model() -> ModelConfig:
    """Nemotron's layer kinds at a CPU-trainable size: three Mamba-2 mixers, three MLPs and one attention
    layer, and two MTP depths, each an attention layer and an MLP (Super's `*E` with the MoE replaced by
    an MLP, which trains faster on a CPU); byte vocabulary."""
    return from_pattern("M-M*-M-", vocab_size=256, hidden_size=192, name="speculative-mtp",
                        mamba=MambaSpec(num_heads=6, head_dim=64, n_groups=2, state_size=32, chunk_size=64),
                        attention=AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=48), mlp=MLPSpec(768),
                        mtp_pattern="*-", mtp_depth=2)


def train_config() -> TrainConfig:
    return TrainConfig(out_dir=str(RUN), **RECIPE)


def stage_train(results: dict, args) -> None:
    summary = train(train_config(), model_config=mtp_model())
    final = summary["final_eval"]
    results["train"] = {"recipe": RECIPE, "pattern": "M-M*-M-", "mtp_pattern": "*-", "mtp_depth": 2,
                        "parameters": nj.param_counts(mtp_model()), "seconds": summary["seconds_total"],
                        "tokens": RECIPE["steps"] * RECIPE["batch_size"] * RECIPE["seq_len"],
                        "eval_loss": final["ce"], "eval_accuracy": final["accuracy"],
                        "eval_mtp_loss": final.get("mtp_loss")}


def heldout_prompts(tc, count: int, length: int) -> np.ndarray:
    """int32 [count, length]: the first `length` tokens of the first `count` held-out windows."""
    ds = make_dataset(tc, "validation")
    windows = np.concatenate([ds.batch(i)["inputs"] for i in range(-(-count // tc.batch_size))])
    return windows[:count, :length]


def greedy_runs(model, prompts, new_tokens: int, k: int, batch: int) -> dict:
    """Speculative greedy decoding of every prompt against plain greedy, `batch` prompts per call."""
    same, kept, steps = [], [], 0
    for i in range(0, len(prompts), batch):
        x = jnp.asarray(prompts[i:i + batch])
        out, stats = nj.generate(model, x, new_tokens, draft="mtp", num_draft=k, return_stats=True)
        same += (np.asarray(out) == np.asarray(nj.generate(model, x, new_tokens))).all(axis=1).tolist()
        kept += stats["accepted_per_step"].tolist()
        steps += stats["steps"]
    return {"identical": int(sum(same)), "outputs": len(same), **acceptance(kept, k)}


def acceptance(kept: list[int], k: int) -> dict:
    """Drafts kept per verification step -> the acceptance rate, tokens per step, how often each number of
    drafts was kept and, per draft position i, P(draft i kept | drafts 1..i-1 kept)."""
    kept = np.asarray(kept)
    reached = [int(np.sum(kept >= i)) for i in range(k + 1)]
    return {"steps": len(kept), "acceptance_rate": float(kept.mean() / k), "tokens_per_step": float(kept.mean() + 1),
            "kept_histogram": np.bincount(kept, minlength=k + 1).tolist(),
            "position_acceptance": [reached[i] / reached[i - 1] if reached[i - 1] else None for i in range(1, k + 1)]}


def stage_acceptance(results: dict, args) -> None:
    tc, model, _ = load_run(RUN)
    prompts = heldout_prompts(tc, args.prompts, args.prompt_len)
    out = {"prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "draft_lengths": list(args.draft_lengths), "greedy": {}, "greedy_batch": {}, "sampled": {},
           "temperature": args.temperature, "batch": args.batch}
    for k in args.draft_lengths:
        out["greedy"][str(k)] = greedy_runs(model, prompts, args.new_tokens, k, 1)
        out["greedy_batch"][str(k)] = greedy_runs(model, prompts, args.new_tokens, k, args.batch)
        kept = []
        for i, prompt in enumerate(prompts):
            _, stats = nj.generate(model, jnp.asarray(prompt[None]), args.new_tokens, temperature=args.temperature,
                                   key=jax.random.key(i), draft="mtp", num_draft=k, return_stats=True)
            kept += stats["accepted_per_step"].tolist()
        out["sampled"][str(k)] = acceptance(kept, k)
        g = out["greedy"][str(k)]
        print(f"k={k}: greedy acceptance {g['acceptance_rate']:.3f} ({g['tokens_per_step']:.2f} tokens/step, "
              f"identical {g['identical']}/{g['outputs']}), batch {args.batch} "
              f"{out['greedy_batch'][str(k)]['acceptance_rate']:.3f}, T={args.temperature} "
              f"{out['sampled'][str(k)]['acceptance_rate']:.3f}")
    results["acceptance"] = out


def stage_throughput(results: dict, args) -> None:
    """Plain and speculative greedy decoding through their compiled functions (what `nj.generate` calls, without
    its per-call argument checks and model split), each call synchronised; configurations in turns per repeat.
    Each configuration is also timed with one new token (the prompt's prefill, and for speculative decoding
    the MTP depths' prefill and first drafts): decode time = the difference, for new_tokens - 1 tokens."""
    tc, model, _ = load_run(RUN)
    graphdef, state = nnx.split(inference_copy(model))
    key = jax.random.key(0)
    sampling = dict(temperature=0.0, top_k=None, top_p=None)
    new = args.new_tokens
    out = {"prompt_len": args.prompt_len, "new_tokens": new, "repeats": args.repeats, "batches": {}}
    for batch in (1, args.batch):
        prompts = jnp.asarray(heldout_prompts(tc, args.timed_prompts * batch, args.prompt_len))
        calls = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        runs = {"plain": lambda x, n: _generate(graphdef, state, x, key, max_new_tokens=n, kv_cache_dtype=None,
                                                **sampling)}
        for k in args.draft_lengths:
            runs[f"k={k}"] = lambda x, n, k=k: speculative_generate(graphdef, state, x, key, num_draft=k,
                                                                    max_new_tokens=n, **sampling)
        total = args.prompt_len + new
        reference = [np.asarray(runs["plain"](x, new)) for x in calls]  # also compiles
        identical, steps = {}, {}
        for name, fn in runs.items():
            jax.block_until_ready([fn(x, 1) for x in calls])  # compiles the prefill-only call
            if name != "plain":
                done = [fn(x, new) for x in calls]  # compiles
                identical[name] = int(sum((np.asarray(r[0])[:, :total] == ref).all(axis=1).sum()
                                          for r, ref in zip(done, reference)))
                steps[name] = int(sum(int(r[2]) for r in done))
        seconds = {name: {"full": [], "prefill": []} for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                for part, n in (("full", new), ("prefill", 1)):
                    t0 = time.perf_counter()
                    for x in calls:
                        jax.block_until_ready(fn(x, n))
                    seconds[name][part].append(time.perf_counter() - t0)
        rows = {}
        decode = {name: [f - p for f, p in zip(t["full"], t["prefill"])] for name, t in seconds.items()}
        for name, t in seconds.items():
            speedup = [p / s for p, s in zip(decode["plain"], decode[name])]  # paired within a repeat
            end_to_end = [p / s for p, s in zip(seconds["plain"]["full"], t["full"])]
            rows[name] = {"seconds": t["full"], "prefill_seconds": t["prefill"], "decode_seconds": decode[name],
                          "decode_tokens_per_s": [len(prompts) * (new - 1) / s for s in decode[name]],
                          "speedup": speedup, "end_to_end_speedup": end_to_end}
            if name != "plain":
                rows[name].update(identical=identical[name], outputs=len(prompts), steps=steps[name],
                                  seconds_per_step=float(np.median(decode[name])) / steps[name])
            print(f"batch {batch} {name:>6}: decode {np.median(rows[name]['decode_tokens_per_s']):8.1f} tokens/s, "
                  f"speedup {min(speedup):.2f}-{max(speedup):.2f} (end to end {min(end_to_end):.2f}-"
                  f"{max(end_to_end):.2f})" + (f", identical {identical[name]}/{len(prompts)}" if name != "plain" else ""))
        out["batches"][str(batch)] = {"prompts": len(prompts), "calls": len(calls), "runs": rows}
    results["throughput"] = out


def seconds_per_iteration(graphdef, state, body, carry, iters: int, rounds: int) -> float:
    """`carry = body(model, carry)` run `iters` times in one compiled loop: the median over `rounds` of the
    seconds per iteration. Every body feeds its outputs back as its next inputs, so nothing is loop-invariant."""
    @jax.jit
    def run(state, carry):
        model = nnx.merge(graphdef, state)
        return jax.lax.fori_loop(0, iters, lambda i, c: body(model, c), carry)

    jax.block_until_ready(run(state, carry))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(run(state, carry))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / iters


def _greedy(model, h):
    return jnp.argmax(model.logits(model.norm_f(h)), axis=-1).astype(jnp.int32)


def _forward(m, collect):
    """The main model over m tokens on the cache (its position kept, so every iteration writes the same slots)."""
    def body(model, carry):
        cache, tokens = carry
        h, new, _ = model._run(tokens, cache, collect=collect)
        return dict(new, pos=cache["pos"]), _greedy(model, h)[:, :m]
    return body


def _stateful_rerun(m):
    """The rejection path: every layer that does not roll back by position re-run over m tokens."""
    def body(model, carry):
        layers, x = carry
        new = []
        for block, cache in zip(model.layers, layers):
            if not _rolls_back_by_position(block, cache):
                x, cache = block(x, cache, POSITION, model.embeddings[...].dtype)
            new.append(cache)
        return tuple(new), x
    return body


def _mtp_depth(model, carry):
    """One MTP depth over L tokens and its LM head at the last one (drafting a token)."""
    cache, tokens, below = carry
    out, normed, cache = model.mtp[0](model.embed(tokens), below, cache, POSITION)
    drafted = jnp.argmax(model.logits(normed[:, -1]), axis=-1).astype(jnp.int32)
    return cache, jnp.roll(tokens, -1, axis=1).at[:, -1].set(drafted), out


POSITION = 128  # tokens in the cache when a piece is timed: the middle of a generation


def stage_profile(results: dict, args) -> None:
    """Each piece of a speculative step timed alone at batch 1 with the trained weights, then the step cost
    they add up to under the measured distribution of accepted drafts (acceptance stage, batch 1)."""
    tc, model, _ = load_run(RUN)
    graphdef, state = nnx.split(inference_copy(model))
    kmax = max(args.draft_lengths)
    max_len = args.prompt_len + args.new_tokens + kmax + 1
    prompt = jnp.asarray(heldout_prompts(tc, 1, POSITION + 2 * kmax + 1))
    cache = nnx.jit(lambda m, t: m.forward(t, m.init_cache(1, max_len))[1])(model, prompt[:, :POSITION])
    _, _, inputs = model._run(prompt[:, POSITION:POSITION + kmax + 1], cache, collect=True)
    mtp_cache = model.mtp[0].init_cache(1, max_len, dtype=model.dtype, ssm_dtype=jnp.dtype(model.cfg.ssm_cache_dtype))
    h = model.hidden_states(prompt)[0]
    timed = partial(seconds_per_iteration, graphdef, state, iters=args.profile_iters, rounds=args.repeats)
    pieces = {"forward": {}, "forward_collect": {}, "stateful_rerun": {}, "mtp_depth": {}}
    for m in range(1, kmax + 2):
        toks = prompt[:, POSITION:POSITION + m]
        pieces["forward"][m] = timed(_forward(m, False), (cache, toks))
        pieces["forward_collect"][m] = timed(_forward(m, True), (cache, toks))
        pieces["stateful_rerun"][m] = timed(_stateful_rerun(m), (cache["layers"], inputs[0][:, :m]))
    for n in range(1, 2 * kmax + 1):  # depth j of a step that kept a drafts reads a + j tokens
        pieces["mtp_depth"][n] = timed(_mtp_depth, (mtp_cache, prompt[:, :n], h[:, :n]))
    print({name: {m: f"{t * 1e6:.0f} us" for m, t in piece.items()} for name, piece in pieces.items()})
    steps = {}
    for k in args.draft_lengths:
        hist = np.asarray(results["acceptance"]["greedy"][str(k)]["kept_histogram"], float)
        p = hist / hist.sum()
        verify = pieces["forward_collect"][k + 1]
        rollback = sum(p[a] * pieces["stateful_rerun"][a + 1] for a in range(k))
        whole_rerun = sum(p[a] * pieces["forward"][a + 1] for a in range(k))
        drafting = sum(p[a] * sum(pieces["mtp_depth"][a + j] for j in range(1, k + 1)) for a in range(k + 1))
        measured = results["throughput"]["batches"]["1"]["runs"][f"k={k}"]["seconds_per_step"]
        steps[str(k)] = {"verify": verify, "rollback": rollback, "whole_model_rerun": whole_rerun, "drafting": drafting,
                    "measured_step": measured, "rest": measured - verify - rollback - drafting}
    results["profile"] = {"position": POSITION, "iters": args.profile_iters, "rounds": args.repeats,
                          "pieces": {name: {str(m): t for m, t in piece.items()} for name, piece in pieces.items()},
                          "steps": steps}


def plot(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc, thr, prof = results["acceptance"], results["throughput"], results["profile"]
    ks = acc["draft_lengths"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    ax = axes[0]
    for k in ks:
        ax.plot(range(1, k + 1), acc["greedy"][str(k)]["position_acceptance"], "o-", label=f"k={k}")
    ax.set(xlabel="draft position i", ylabel="P(draft i kept | drafts before it kept)", ylim=(0, 1),
           title="greedy acceptance by position (batch 1)", xticks=range(1, max(ks) + 1))
    ax.legend()
    ax = axes[1]
    for batch, marker in zip(thr["batches"], "os"):
        runs = thr["batches"][batch]["runs"]
        ratios = [runs[f"k={k}"]["speedup"] for k in ks]
        med = [np.median(r) for r in ratios]
        err = [[m - min(r) for m, r in zip(med, ratios)], [max(r) - m for m, r in zip(med, ratios)]]
        ax.errorbar(ks, med, yerr=err, fmt=marker + "-", capsize=3, label=f"batch {batch}")
    ax.axhline(1.0, color="gray", lw=1)
    ax.axhline(1.5, color="gray", lw=1, ls="--", label="goal 1.5x")
    ax.set(xlabel="draft length k", ylabel="decode throughput / plain greedy decoding's", xticks=ks,
           title="speedup (median, range over repeats)")
    ax.legend()
    ax = axes[2]
    parts = ("verify", "rollback", "drafting", "rest")
    bottom = np.zeros(len(ks))
    for part in parts:
        v = np.array([prof["steps"][str(k)][part] * 1e3 for k in ks])
        ax.bar(ks, v, bottom=bottom, label=part)
        bottom += v
    plain = thr["batches"]["1"]["runs"]["plain"]
    per_token = float(np.median(plain["decode_seconds"])) / (thr["batches"]["1"]["prompts"] * (thr["new_tokens"] - 1))
    tokens = [acc["greedy"][str(k)]["tokens_per_step"] for k in ks]
    ax.plot(ks, [per_token * t * 1e3 for t in tokens], "k*--", ms=10, label="plain decoding, same tokens")
    ax.set(xlabel="draft length k", ylabel="ms per speculative step (batch 1)", xticks=ks,
           title="where a step's time goes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS.with_suffix(".png"), dpi=110)


def environment() -> dict:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "load_average": list(os.getloadavg())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redo", choices=STAGES, action="append", default=[], help="run this stage again (repeatable)")
    p.add_argument("--only", choices=STAGES, action="append", help="run only these stages (repeatable)")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts for the acceptance rates")
    p.add_argument("--timed-prompts", type=int, default=8, help="prompts (per row of a batch) timed per repeat")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--draft-lengths", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--batch", type=int, default=8, help="the batched runs' batch size (besides batch 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampled acceptance rates")
    p.add_argument("--profile-iters", type=int, default=200, help="iterations of each timed piece's loop")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats, configurations in turns")
    args = p.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for stage in args.only or STAGES:
        if stage in results and stage not in args.redo:
            print(f"{stage}: done (--redo {stage} to run it again)")
            continue
        t0 = time.time()
        STAGE_FUNCTIONS[stage](results, args)
        results.setdefault("environment", {})[stage] = dict(environment(), seconds=time.time() - t0)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    if all(stage in results for stage in STAGES):
        plot(results)


STAGE_FUNCTIONS = {"train": stage_train, "acceptance": stage_acceptance, "throughput": stage_throughput,
                   "profile": stage_profile}

if __name__ == "__main__":
    main()
