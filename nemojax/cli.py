"""The `nemojax` command."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
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


def cmd_train(args) -> int:
    from nemojax.train import TrainConfig, train
    from nemojax.train.loop import TrainingDiverged

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["data_options"] = _parse_options(values["data_options"])
    tc = TrainConfig(**values)
    try:
        s = train(tc)
    except TrainingDiverged as err:
        print(f"nemojax train: error: {err}", file=sys.stderr)
        return 1
    print(f"\nrun directory  {tc.out_dir}  (checkpoints/, metrics.jsonl, loss.png, summary.json)")
    if s.get("interrupted"):
        print(f"interrupted by {s['interrupted']} at step {s['step']}: checkpoint saved; run the same command "
              "again to resume")
        return 130
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
    from nemojax.train.sample import sample_text

    tc, model, _ = load_run(args.checkpoint)
    ds = make_dataset(tc)
    if ds.tokenizer is None:
        raise SystemExit(f"--checkpoint {args.checkpoint} was trained on the synthetic task {tc.data!r}, which has "
                         "no text tokenizer; use `nemojax eval` for it")
    sampling = args.temperature > 0
    top_k = args.top_k if args.top_k is not None or not sampling else DEFAULT_TOP_K
    print(args.prompt + sample_text(model, ds, args.prompt, args.max_new_tokens, args.seed,
                                    temperature=args.temperature, top_k=top_k, top_p=args.top_p))
    return 0


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
    p.set_defaults(func=cmd_generate)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"nemojax {args.command}: error: {err}\n")
    except KeyboardInterrupt:  # start-up and compilation; the training loop itself saves and returns
        parser.exit(130, f"nemojax {args.command}: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
