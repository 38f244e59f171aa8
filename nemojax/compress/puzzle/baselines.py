"""The simple architecture searches Puzzle's MIP is compared against, on the same option table and
budgets (`search._bounds` turns named budgets into bounds on cost columns):

- greedy: every layer gets an equal share of each budget and takes its best-scoring option within it;
- max_params: the MIP maximising the parameters kept instead of the quality score;
- noop_only: the MIP over a search space of each layer's parent and no-op options alone;
- uniform: the same width fraction in every layer (MLP channels, Mamba heads, experts, KV heads),
  the widest fraction that fits;
- random_feasible: children drawn uniformly per layer, kept when they fit (the study evaluates them
  and reports the best).
"""

from __future__ import annotations

import re

import numpy as np

from nemojax.compress.puzzle.search import OBJECTIVES, Infeasible, Options, _bounds, solve

# option name -> the fraction of the parent's width it keeps (attention: its KV heads, via `kv_fraction`)
_WIDTH = re.compile(r"^(mlp_w|mamba_h|moe_e)(\d+)(_rcv)?$")


def _fits(options: Options, bounds: dict, choice) -> bool:
    return all(options.total(col, choice) <= bound * (1 + 1e-12) for col, bound in bounds.items())


def _record(options: Options, choice, objective: str, batch) -> dict:
    choice = np.asarray(choice)
    return {"batch_size": batch, "keys": [options.keys[i][j] for i, j in enumerate(choice)],
            "choice": choice.tolist(), "score": options.total(objective, choice)}


def greedy(options: Options, budgets, *, objective: str = "kl", batch=None, relative: bool = True) -> dict:
    """Equal per-layer shares of every budget; each layer takes its best option within its share (its
    cheapest when none fits). Raises `Infeasible` when the result breaks a budget."""
    bounds = _bounds(options, budgets, batch, relative)
    n_layers = len(options.keys)
    scores = options.scores[objective] * (-1 if OBJECTIVES[objective] else 1)
    fits = np.ones(scores.shape, bool)
    for col, bound in bounds.items():
        fits &= options.costs[col] <= bound / n_layers
    share = sum((options.costs[c] / b for c, b in bounds.items()), np.zeros(scores.shape))
    cheapest = np.nanargmin(np.where(np.isnan(scores), np.nan, share), axis=1)  # fewest budget shares used
    choice = [int(np.nanargmin(np.where(fits[i], scores[i], np.nan))) if (fits[i] & ~np.isnan(scores[i])).any()
              else int(cheapest[i]) for i in range(n_layers)]
    if not _fits(options, bounds, choice):
        raise Infeasible(f"greedy: equal per-layer shares of {dict(budgets)} break the budget")
    return _record(options, choice, objective, batch)


def max_params(options: Options, budgets, *, objective: str = "kl", batch=None, relative: bool = True) -> dict:
    """The feasible choice that keeps the most parameters."""
    bounds = _bounds(options, budgets, batch, relative)
    return _record(options, solve(options.costs["params"], options.costs, bounds, maximize=True), objective, batch)


def noop_only(options: Options, budgets, *, objective: str = "kl", batch=None, relative: bool = True) -> dict:
    """The MIP over each layer's parent and no-op options only."""
    space = options.restrict(lambda key: key.endswith(":noop"))
    bounds = _bounds(space, budgets, batch, relative)
    return _record(space, solve(space.scores[objective], space.costs, bounds, maximize=OBJECTIVES[objective]),
                   objective, batch)


def width_fraction(name: str, kv_heads: dict | None = None) -> float | None:
    """The fraction of its parent's width an option keeps (1.0 for the parent), None for the others."""
    if name == "parent":
        return 1.0
    m = _WIDTH.match(name)
    if m and (m.group(1) != "moe_e" or m.group(3)):  # experts: the ranked-choice ranking stands for the width
        return int(m.group(2)) / 100
    m = re.match(r"^attn_kv(\d+)$", name)
    if m and kv_heads:
        return int(m.group(1)) / kv_heads
    return None


def uniform(options: Options, budgets, *, objective: str = "kl", batch=None, relative: bool = True,
            kv_heads: dict | None = None) -> dict:
    """The widest fraction f such that every layer taking its widest option of fraction <= f fits.
    `kv_heads` maps layer -> the parent's KV heads (attention layers then shrink their KV heads too)."""
    bounds = _bounds(options, budgets, batch, relative)
    fractions = [[None if k is None else width_fraction(k.split(":", 1)[1], (kv_heads or {}).get(i))
                  for k in row] for i, row in enumerate(options.keys)]
    for f in sorted({x for row in fractions for x in row if x is not None}, reverse=True):
        choice = [max((j for j, x in enumerate(row) if x is not None and x <= f + 1e-9), key=lambda j: row[j])
                  if any(x is not None and x <= f + 1e-9 for x in row) else None for row in fractions]
        if None not in choice and _fits(options, bounds, choice):
            return dict(_record(options, choice, objective, batch), fraction=f)
    raise Infeasible(f"uniform: no single width fraction fits {dict(budgets)}")


def random_feasible(options: Options, budgets, n: int, *, seed: int = 0, objective: str = "kl", batch=None,
                    relative: bool = True, tries: int = 100_000) -> list[dict]:
    """Up to `n` distinct feasible choices, each layer's option drawn uniformly among its options."""
    bounds = _bounds(options, budgets, batch, relative)
    rng = np.random.default_rng(seed)
    available = [np.flatnonzero([k is not None for k in row]) for row in options.keys]
    found: dict[tuple, dict] = {}
    for _ in range(tries):
        choice = tuple(int(rng.choice(a)) for a in available)
        if choice not in found and _fits(options, bounds, choice):
            found[choice] = _record(options, choice, objective, batch)
            if len(found) == n:
                break
    return list(found.values())
