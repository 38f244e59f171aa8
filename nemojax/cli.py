"""The `nemojax` command."""

from __future__ import annotations

import argparse
import sys

from nemojax import config as cfg_mod

DEFAULT_PRESET = "nemotron-3-nano-30b-a3b"


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def cmd_info(args) -> int:
    from nemojax.nn.model import param_counts

    cfg = cfg_mod.get(args.preset)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nemojax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="layer pattern and parameter counts of a preset")
    p.add_argument("preset", nargs="?", default=DEFAULT_PRESET, choices=cfg_mod.names(), metavar="PRESET",
                   help=f"one of: {', '.join(cfg_mod.names())} (default {DEFAULT_PRESET})")
    p.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
