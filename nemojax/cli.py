"""The `nemojax` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import traceback
import typing

from nemojax import presets

DEFAULT_PRESET = "nemotron-3-nano-30b-a3b"
DEFAULT_TOP_K = 40


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {n}")
    return n


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def cmd_info(args) -> int:
    from nemojax.nn.model import param_counts

    cfg = presets.get(args.preset)
    c = param_counts(cfg)
    kinds = {s: cfg.pattern.count(s) for s in "M*-E"}
    print(f"preset      {args.preset}")
    print(f"layers      {len(cfg.layers)}  (mamba {kinds['M']}, attention {kinds['*']}, mlp {kinds['-']}, "
          f"moe {kinds['E']})")
    print(f"pattern     {cfg.pattern}")
    if cfg.mtp_depth:
        print(f"mtp         depth {cfg.mtp_depth}, pattern {cfg.mtp_pattern}, {_fmt(c['mtp'])} parameters")
    print(f"hidden      {cfg.hidden_size}   vocab {cfg.vocab_size}")
    print(f"parameters  total {_fmt(c['total'])}   active/token {_fmt(c['active'])}   "
          f"(embedding {_fmt(c['embedding'])}, lm_head {_fmt(c['lm_head'])}; both counted as active)")
    return 0


def _parse_options(items: list[str]) -> dict:
    """KEY=VALUE pairs; values that parse as int or float become numbers."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--data-options: expected KEY=VALUE, got {item!r}")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        out[key] = value
    return out


def _add_dataclass_args(parser, cls) -> None:
    """One --flag per field of the dataclass, typed from its annotations, help from field metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f.metadata.get("default", repr(default) if isinstance(default, str) else default)
        help_ = f"{f.metadata['help']} (default: {shown})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif kind is dict:
            parser.add_argument(flag, nargs="*", default=[], metavar="KEY=VALUE", help=help_)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(flag, type=base, default=default, metavar=base.__name__.upper(), help=help_)


RUNTIME_FLAGS = ("coordinator_address", "num_processes", "process_id", "heartbeat_timeout")


def _add_distributed_args(parser) -> None:
    from nemojax.train.distributed import DEFAULT_HEARTBEAT_TIMEOUT

    g = parser.add_argument_group("several processes (jax.distributed; not saved with the run)")
    g.add_argument("--distributed", action="store_true",
                   help="join the other processes of one run: the mesh spans all their devices, each process "
                        "loads its own rows of every batch, process 0 writes the run's files; the coordinator, "
                        "process count and id come from the flags below or from a SLURM job's, Open MPI's or a "
                        "cloud TPU pod's environment (default: one process)")
    g.add_argument("--coordinator-address", metavar="HOST:PORT", default=None,
                   help="process 0's host and a free port, the same for every process (default: "
                        "$JAX_COORDINATOR_ADDRESS or the cluster's)")
    g.add_argument("--num-processes", type=_positive_int, default=None,
                   help="how many processes the run has (default: the cluster's)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process's id, 0 to num-processes - 1; 0 writes the files (default: the cluster's)")
    g.add_argument("--heartbeat-timeout", type=_positive_int, default=None, metavar="SECONDS",
                   help="a process silent this long counts as dead, and every other process exits with an error "
                        f"(default: {DEFAULT_HEARTBEAT_TIMEOUT})")


def _join_processes(args) -> None:
    """jax.distributed.initialize when --distributed; the runtime flags are refused without it."""
    given = [f"--{name.replace('_', '-')}" for name in RUNTIME_FLAGS if getattr(args, name) is not None]
    if not args.distributed:
        if given:
            raise ValueError(f"{', '.join(given)}: only with --distributed")
        return
    from nemojax.train.distributed import DEFAULT_HEARTBEAT_TIMEOUT, initialize

    initialize(args.coordinator_address, args.num_processes, args.process_id,
               heartbeat_timeout=args.heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT)


def cmd_train(args) -> int:
    from nemojax.train import TrainConfig, train
    from nemojax.train.distributed import is_main
    from nemojax.train.loop import TrainingDiverged

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["data_options"] = _parse_options(values["data_options"])
    tc = TrainConfig(**values)
    _join_processes(args)
    try:
        s = train(tc)
    except TrainingDiverged as err:
        print(f"nemojax train: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        if not args.distributed or isinstance(err, (ValueError, FileNotFoundError)):
            raise  # refused settings are refused by every process alike; main() reports them
        # One process failed, the others wait in a collective. Exiting through JAX's shutdown barrier would
        # keep this one waiting for them for minutes; exiting now lets their heartbeats notice it.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    reports = is_main()  # process 0 reports for the run
    if reports:
        print(f"\nrun directory  {tc.out_dir}  (checkpoints/, metrics.jsonl, loss.png, summary.json)")
    if s.get("interrupted"):
        if reports:
            print(f"interrupted by {s['interrupted']} at step {s['step']}: checkpoint saved; run the same command "
                  "again to resume")
        return 130
    if not reports:
        return 0
    if "final_eval" not in s:
        print(f"stopped at step {s['step']} of {tc.steps}")
        return 0
    a, b = s["initial_eval"], s["final_eval"]
    print(f"held-out loss ({s['eval_tokens']} tokens)  untrained {a['ce']:.3f} -> trained {b['ce']:.3f} nats/token "
          f"(perplexity {math.exp(a['ce']):.1f} -> {math.exp(b['ce']):.2f}); "
          f"accuracy {a['accuracy']:.3f} -> {b['accuracy']:.3f}")
    if "sample" in s:
        print(f"sample ({tc.data}):\n{s['sample']}")
    return 0


def cmd_eval(args) -> int:
    from flax import nnx

    from nemojax.train.loop import eval_tokens, load_run, make_dataset
    from nemojax.train.step import evaluate, make_eval_step

    tc, model, record = load_run(args.checkpoint, args.step)
    batches = tc.eval_batches if args.batches is None else args.batches
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ds = make_dataset(tc, args.split)
    ev = evaluate(make_eval_step(graphdef, tc), {"params": params, "rest": rest}, ds, batches)
    print(f"step {record['step']}  {tc.data} ({args.split}, {batches} x {tc.batch_size} x {tc.seq_len}, "
          f"{eval_tokens(ds, batches)} tokens scored)  loss {ev['ce']:.4f} nats/token  "
          f"perplexity {math.exp(ev['ce']):.2f}  accuracy {ev['accuracy']:.4f}")
    return 0


def cmd_generate(args) -> int:
    from nemojax.train.loop import load_run, make_dataset
    from nemojax.train.sample import continue_text

    tc, model, _ = load_run(args.checkpoint)
    ds = make_dataset(tc)
    if ds.tokenizer is None:
        raise SystemExit(f"--checkpoint {args.checkpoint} was trained on the synthetic task {tc.data!r}, which has "
                         "no text tokenizer; use `nemojax eval` for it")
    if args.num_draft is not None and args.draft is None:
        raise ValueError("--num-draft: drafts only with --draft mtp")
    if args.calibration_batches is not None and args.kv_cache_dtype != "fp8":
        raise ValueError("--calibration-batches: calibrates the scales of --kv-cache-dtype fp8 only")
    sampling = args.temperature > 0
    top_k = args.top_k if args.top_k is not None or not sampling else DEFAULT_TOP_K
    if args.kv_cache_dtype == "fp8":  # scales calibrated on the run's own training text
        from nemojax.quant.kv_cache import calibrate_kv_scales, set_kv_scales

        batches = range(args.calibration_batches or 4)
        set_kv_scales(model, calibrate_kv_scales(model, [ds.batch(i)["inputs"] for i in batches]))
    options = {"kv_cache_dtype": args.kv_cache_dtype}
    if args.draft is not None:
        options |= {"draft": args.draft, "num_draft": args.num_draft}
    text, stats = continue_text(model, ds, args.prompt, args.max_new_tokens, args.seed, temperature=args.temperature,
                                top_k=top_k, top_p=args.top_p, **options)
    print(args.prompt + text)
    if stats is not None:
        print(f"speculative decoding: {stats['steps']} verification steps, {stats['acceptance_rate']:.0%} of "
              f"{stats['num_draft']} drafts accepted", file=sys.stderr)
    return 0


def _csv(cast):
    def parse(text: str):
        try:
            return [cast(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {cast.__name__}; got {text!r}")
    return parse


def _budgets(items: list[str]) -> dict:
    from nemojax.compress.puzzle import BUDGETS

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in BUDGETS:
            raise ValueError(f"--budget: expected NAME=VALUE with NAME one of {', '.join(BUDGETS)}; got {item!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--budget {name}: {value!r} is not a number") from None
    return out


def cmd_puzzle(args) -> int:
    from nemojax.compress.puzzle import pipeline as pz

    d, stage = args.dir, args.stage
    for flag, stages in (("parent", ("run",)), ("search", ("assemble",)), ("child", ("distill",))):
        if stage in stages and getattr(args, flag) is None:
            raise ValueError(f"--{flag}: required by `nemojax puzzle {stage}`")
    if stage in ("library", "run"):
        path = pz.run_library(d, args.parent, kinds=args.kinds, layers=args.layers,
                              calibration_batches=args.calibration_batches)
        print(f"library  {path}")
    if stage in ("bld", "run"):
        record = pz.run_bld(d, tokens=args.bld_tokens, lr=args.bld_lr)
        trained = [k for k, r in record.items() if r["status"] == "trained"]
        print(f"bld      {len(trained)} candidates trained ({d}/bld/bld.json)")
    if stage in ("score", "run"):
        path = pz.run_score(d, eval_batches=args.eval_batches, batch_sizes=args.batch_sizes, dtype=args.dtype,
                            measure=not args.no_measure, gpu=args.gpu)
        print(f"scores   {path} (and scores.png)")
    name = None
    if stage in ("search", "run"):
        budgets = _budgets(args.budget)
        path = pz.run_search(d, budgets, name=args.name, objective=args.objective, relative=not args.absolute,
                             k=args.k, latency=args.latency)
        name = path.stem
        best = json.loads(path.read_text())["mip"][0]
        print(f"search   {path}: batch {best['batch_size']}, {args.objective} {best['score']:.4g}")
        for key in best["keys"]:
            print(f"           {key}")
    if stage in ("assemble", "run"):
        child = pz.run_assemble(d, name or args.search, which=args.which, index=args.index)
        print(f"child    {child}")
        name = child.name
    if stage in ("distill", "run"):
        s = pz.run_distill(d, name or args.child, steps=args.distill_steps, lr=args.distill_lr, lm=args.lm)
        kl = s.get("kl_to_parent", {})
        print("distill  " + ", ".join(f"KL to parent {k} {v:.4f}" for k, v in kl.items()))
    return 0


def _add_puzzle(sub) -> None:
    p = sub.add_parser("puzzle", help="Puzzle: compress a trained run (library, bld, score, search, assemble, "
                                      "distill, or all of them with `run`)")
    p.add_argument("stage", choices=("library", "bld", "score", "search", "assemble", "distill", "run"),
                   help="the stage to run on DIR (each reads the outputs of the stages before it)")
    p.add_argument("dir", help="the Puzzle directory (created by the library stage)")
    g = p.add_argument_group("library")
    g.add_argument("--parent", help="run directory of the parent (`nemojax train --out-dir`); library and run")
    g.add_argument("--kinds", type=_csv(str), default=None,
                   help="candidate kinds to offer, e.g. mlp,noop (default: all)")
    g.add_argument("--layers", type=_csv(int), default=None, help="parent layers that may change (default: all)")
    g.add_argument("--calibration-batches", type=_positive_int, default=4,
                   help="training batches that rank channels, heads and experts (default: 4)")
    g = p.add_argument_group("bld")
    g.add_argument("--bld-tokens", type=_positive_int, default=200_000, help="tokens per candidate (default: 200000)")
    g.add_argument("--bld-lr", type=float, default=1e-3, help="BLD learning rate (default: 1e-3)")
    g = p.add_argument_group("score")
    g.add_argument("--eval-batches", type=_positive_int, default=4, help="held-out batches (default: 4)")
    g.add_argument("--batch-sizes", type=_csv(int), default=[1, 8], help="batch sizes of the costs (default: 1,8)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the memory, roofline and timed latency (default: float32)")
    g.add_argument("--no-measure", action="store_true", help="skip timing the layers (roofline estimates only)")
    g.add_argument("--gpu", default="H100", help="GPU of the roofline estimate: H100, H200, A100 (default: H100)")
    g = p.add_argument_group("search")
    g.add_argument("--budget", action="append", default=[], metavar="NAME=VALUE",
                   help="a budget, repeatable: params, experts, memory, decode_latency, prefill_latency, "
                        "throughput; a fraction of the parent's (e.g. decode_latency=0.5) unless --absolute")
    g.add_argument("--absolute", action="store_true", help="budgets in absolute units (bytes, seconds, tokens/s)")
    g.add_argument("--objective", default="kl", choices=("kl", "lm_loss", "cosine", "accuracy"),
                   help="the replace-one score summed over layers (default: kl)")
    g.add_argument("--latency", default="measured", choices=("measured", "roofline"),
                   help="latency budgets bound the times measured here or the GPU roofline (default: measured)")
    g.add_argument("--k", type=_positive_int, default=1, help="diverse solutions to find (default: 1)")
    g.add_argument("--name", default=None, help="name of the search (default: from the budgets)")
    g = p.add_argument_group("assemble")
    g.add_argument("--search", help="the search to assemble (its --name)")
    g.add_argument("--which", default="mip", help="mip, or a baseline: greedy, max_params, noop_only, uniform")
    g.add_argument("--index", type=int, default=0, help="which of the k MIP solutions (default: 0)")
    g = p.add_argument_group("distill")
    g.add_argument("--child", help="the child to distil (a directory name under DIR/child)")
    g.add_argument("--distill-steps", type=_positive_int, default=200, help="optimizer steps (default: 200)")
    g.add_argument("--distill-lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    g.add_argument("--lm", action="store_true", help="add the LM loss to cosine + KL")
    p.set_defaults(func=cmd_puzzle)


def _runs(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in part.split(":", 1)) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP runs separated by commas, e.g. 1:4,6:8; got {text!r}")


def cmd_fuse(args) -> int:
    from nemojax.compress.fusion import pipeline as fu

    d, stage = args.dir, args.stage
    if args.layers is not None and len(args.layers) != 2:
        raise ValueError(f"--layers: expected START,STOP (one range of layers); got {args.layers}")
    if args.runs is not None and any(len(r) != 2 for r in args.runs):
        raise ValueError(f"--runs: expected START:STOP runs separated by commas; got {args.runs}")
    if stage == "run" and args.parent is None:
        raise ValueError("--parent: required by `nemojax fuse run`")
    if stage in ("plan", "run"):
        fu.check_plan(threshold=args.threshold, keep_last=args.keep_last, blocks=args.blocks, count=args.count)
    fu.init_directory(d, args.parent)
    if args.runs is not None:
        fu.check_runs(args.runs, len(fu.parent_config(d).layers))
    if stage in ("deps", "run"):
        path = fu.run_deps(d, eval_batches=args.eval_batches, layers=args.layers)
        print(f"deps     {path} (and dependency.png)")
    if stage in ("plan", "run"):
        path = fu.run_plan(d, threshold=args.threshold, keep_last=args.keep_last, blocks=args.blocks,
                           count=args.count)
        plan = json.loads(path.read_text())
        print(f"plan     {path}: {len(plan['runs'])} run(s)")
        print(fu.plan_table(plan))
    if stage in ("apply", "run"):
        r = fu.run_apply(d, norm=args.norm, runs=args.runs, eval_batches=args.eval_batches)
        before, after = r["heldout"]["parent"], r["heldout"]["fused"]
        runs = ", ".join(f"{x['op']} {x['start']}:{x['stop']}" for x in r["runs"])
        print(f"fused    {d}/fused ({runs}" + ("" if r["norm"] is None else f"; norm {r['norm']}") + ")")
        print(f"         pattern {r['pattern']['parent']} -> {r['pattern']['fused']}, sequential layers "
              f"{r['sequential_layers']['parent']} -> {r['sequential_layers']['fused']}, parameters "
              f"{r['params']['parent']['total']:,d} -> {r['params']['fused']['total']:,d}")
        print(f"         held-out ({r['eval_batches']} batches): KL to parent {after['kl']:.4f}, accuracy "
              f"{before['accuracy']:.4f} -> {after['accuracy']:.4f}, LM loss {before['lm_loss']:.4f} -> "
              f"{after['lm_loss']:.4f}")
    if stage in ("distill", "run"):
        s = fu.run_distill(d, steps=args.distill_steps, lr=args.distill_lr)
        kl = s.get("kl_to_parent", {})
        print(f"distill  {d}/distill: " + ", ".join(f"KL to parent {k} {v:.4f}" for k, v in kl.items()))
    return 0


def _add_fuse(sub) -> None:
    p = sub.add_parser("fuse", help="FFN Fusion: fuse or parallelise layers of a trained run (deps, plan, apply, "
                                    "distill, or all of them with `run`)")
    p.add_argument("stage", choices=("deps", "plan", "apply", "distill", "run"),
                   help="the stage to run on DIR (each reads the outputs of the stages before it)")
    p.add_argument("dir", help="the FFN Fusion directory (created by --parent)")
    p.add_argument("--parent", help="run directory of the parent (`nemojax train --out-dir`); starts DIR (required "
                                    "by run)")
    p.add_argument("--eval-batches", type=_positive_int, default=4,
                   help="held-out batches of the dependency matrix and of apply's comparison (default: 4)")
    g = p.add_argument_group("deps")
    g.add_argument("--layers", type=_csv(int), default=None,
                   help="START,STOP: measure the dependencies among these layers only (default: all)")
    g = p.add_argument_group("plan")
    g.add_argument("--threshold", type=float, default=None,
                   help="FFN runs whose pairwise dependencies are all at most this cosine distance")
    g.add_argument("--keep-last", action="store_true",
                   help="with --threshold: let runs include the last FFN before an attention or Mamba layer")
    g.add_argument("--blocks", type=_positive_int, default=None,
                   help="instead of --threshold: full-block windows of this many layers, run in parallel")
    g.add_argument("--count", type=_positive_int, default=None,
                   help="with --blocks: at most this many windows (default: as many as fit)")
    g = p.add_argument_group("apply")
    g.add_argument("--norm", default=None, choices=("last", "fold"),
                   help="fused FFN runs read the last FFN's norm (last) or keep their own, folded in (fold) "
                        "(default: last)")
    g.add_argument("--runs", type=_runs, default=None,
                   help="START:STOP,... to fuse instead of the plan's (fuse where all are FFN layers, else "
                        "parallelise)")
    g = p.add_argument_group("distill")
    g.add_argument("--distill-steps", type=_positive_int, default=200, help="optimizer steps (default: 200)")
    g.add_argument("--distill-lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    p.set_defaults(func=cmd_fuse)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nemojax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="layer pattern and parameter counts of a preset")
    p.add_argument("preset", nargs="?", default=DEFAULT_PRESET, choices=presets.names(), metavar="PRESET",
                   help=f"one of: {', '.join(presets.names())} (default {DEFAULT_PRESET})")
    p.set_defaults(func=cmd_info)

    from nemojax.train.config import TrainConfig

    p = sub.add_parser("train", help="train a preset on a dataset (resumes from --out-dir's latest checkpoint)")
    _add_dataclass_args(p, TrainConfig)
    _add_distributed_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out loss, perplexity and accuracy of a training run's checkpoint")
    p.add_argument("--checkpoint", required=True, help="run directory written by `nemojax train`")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--split", default="validation", choices=("train", "validation"),
                   help="which held-out or training batches (default: validation)")
    p.add_argument("--batches", type=_positive_int, default=None,
                   help="batches to evaluate (default: the run's --eval-batches, as in training)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue a text prompt with a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help="run directory written by `nemojax train`")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"sample from the k most likely tokens (default: {DEFAULT_TOP_K} when sampling; "
                        "not allowed at --temperature 0)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches p (default: off; "
                        "not allowed at --temperature 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--draft", choices=("mtp",), default=None,
                   help="speculative decoding with the model's MTP layers as the drafter (default: off)")
    p.add_argument("--num-draft", type=_positive_int, default=None,
                   help="tokens drafted per step with --draft (default: the model's MTP depth)")
    p.add_argument("--kv-cache-dtype", default=None, choices=("fp8", "fp8_uncalibrated", "bfloat16", "float32"),
                   help="attention K/V cache storage: fp8 (E4M3, per-layer scales calibrated on the run's training "
                        "text), fp8_uncalibrated (scales of 1) or a float dtype (default: the model's dtype)")
    p.add_argument("--calibration-batches", type=_positive_int, default=None,
                   help="training batches the fp8 K/V scales are calibrated on (default: 4; only with "
                        "--kv-cache-dtype fp8)")
    p.set_defaults(func=cmd_generate)

    _add_puzzle(sub)
    _add_fuse(sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"nemojax {args.command}: error: {err}\n")
    except KeyboardInterrupt as err:  # start-up and compilation; loops that save first say where
        parser.exit(130, f"nemojax {args.command}: interrupted{': ' + str(err) if str(err) else ''}\n")


if __name__ == "__main__":
    sys.exit(main())
