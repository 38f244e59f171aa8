"""Puzzle's architecture search: one option per layer, best total score under summed-cost budgets,
as a mixed-integer linear program solved by HiGHS (`scipy.optimize.milp`).

Variables x[i, j] in {0, 1} (layer i takes option j); exactly one option per layer; for every budget
sum_ij cost[i, j] x[i, j] <= bound; for every earlier choice y to avoid, the new choice keeps at most
L - min_changed of y's options (it differs from y in at least `min_changed` layers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp


class Infeasible(ValueError):
    """No choice of one option per layer satisfies the budgets (and the diversity constraints)."""


def solve(scores, costs: Mapping[str, np.ndarray], budgets: Mapping[str, float], *, maximize: bool = False,
          avoid: Sequence = (), min_changed: int = 0) -> np.ndarray:
    """The option index of every layer, int [L], that minimises (or, with `maximize`, maximises) the
    summed `scores` [L, K] subject to sum cost <= budget for every named budget.

    scores: float [L, K], NaN where layer i has no option j; costs: name -> [L, K] (values where the
    score is NaN are ignored); budgets: a subset of the cost names -> upper bound on the summed cost;
    avoid: earlier choices (int [L] each) that the result must differ from in >= `min_changed`
    layers. Raises `Infeasible` naming the budgets, with the least each can reach, when nothing fits.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"solve: scores must be a non-empty [layers, options] array; got shape {scores.shape}")
    n_layers, n_options = scores.shape
    available = ~np.isnan(scores)
    empty = np.flatnonzero(~available.any(1))
    if empty.size:
        raise ValueError(f"solve: layers {empty.tolist()} have no option (every score is NaN)")
    if np.isinf(scores[available]).any():
        raise ValueError("solve: scores must be finite or NaN (NaN: no such option)")
    cost = {}
    for name, c in costs.items():
        c = np.asarray(c, np.float64)
        if c.shape != scores.shape:
            raise ValueError(f"solve: cost {name!r} has shape {c.shape}; expected the scores' {scores.shape}")
        bad = np.argwhere(available & ~np.isfinite(c))
        if bad.size:
            raise ValueError(f"solve: cost {name!r} is not finite at (layer, option) {tuple(bad[0].tolist())}, an option "
                             "that has a score")
        cost[name] = np.where(available, c, 0.0)
    unknown = sorted(set(budgets) - set(cost))
    if unknown:
        raise ValueError(f"solve: budgets {unknown} have no cost array; costs given: {sorted(cost)}")
    for name, bound in budgets.items():
        if not np.isfinite(bound):
            raise ValueError(f"solve: budget {name!r} must be a finite number; got {bound!r}")
    if not isinstance(min_changed, (int, np.integer)) or not 0 <= min_changed <= n_layers:
        raise ValueError(f"solve: min_changed must be an int in [0, {n_layers}]; got {min_changed!r}")
    earlier = [np.asarray(y) for y in avoid]
    for k, y in enumerate(earlier):
        if y.shape != (n_layers,) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any() or (y >= n_options).any():
            raise ValueError(f"solve: avoid[{k}] must be an int array of {n_layers} option indices in "
                             f"[0, {n_options}); got {y!r}")

    rows, lower, upper = [], [], []
    for i in range(n_layers):  # exactly one option per layer
        row = np.zeros((n_layers, n_options))
        row[i] = 1.0
        rows.append(row.ravel())
        lower.append(1.0)
        upper.append(1.0)
    for name, bound in budgets.items():
        # HiGHS tests feasibility to an absolute 1e-7: a row in seconds (a roofline layer takes
        # microseconds) would get its budget loosened by whole layers, so each row is scaled to O(1)
        scale = max(abs(float(bound)), float(np.abs(cost[name]).max())) or 1.0
        rows.append(cost[name].ravel() / scale)
        lower.append(-np.inf)
        upper.append(float(bound) / scale)
    if min_changed:
        for y in earlier:  # keep at most L - min_changed of y's options
            row = np.zeros((n_layers, n_options))
            row[np.arange(n_layers), y] = 1.0
            rows.append(row.ravel())
            lower.append(-np.inf)
            upper.append(float(n_layers - min_changed))
    objective = np.where(available, scores, 0.0).ravel() * (-1.0 if maximize else 1.0)
    result = milp(objective, integrality=np.ones(objective.size), bounds=Bounds(0.0, available.ravel().astype(float)),
                  constraints=LinearConstraint(np.stack(rows), lower, upper))
    if result.status == 2:
        least = {name: float(np.where(available, cost[name], np.inf).min(1).sum()) for name in budgets}
        detail = ", ".join(f"{n} <= {budgets[n]:g} (least reachable {least[n]:g})" for n in budgets)
        diversity = f", differing from {len(earlier)} earlier choice(s) in >= {min_changed} layers" if min_changed else ""
        raise Infeasible(f"no choice of one option per layer fits the budgets: {detail or 'none'}{diversity}")
    if result.status != 0:
        raise RuntimeError(f"solve: the MILP solver stopped without a solution: {result.message}")
    return np.argmax(result.x.reshape(n_layers, n_options), axis=1).astype(np.int64)


# What a budget can bound. Costs that depend on the batch size are tabulated per batch size b under
# the name "<cost>@<b>" (e.g. "memory@8"); "throughput" is the decode rate b / (summed decode latency)
# and bounds "decode_latency@<b>" from the other side.
BUDGETS = {
    "params": "parameters of the layers",
    "experts": "routed experts, summed over the layers",
    "memory": "bytes of weights, KV cache and SSM state at batch b",
    "decode_latency": "seconds of one decode step at batch b",
    "prefill_latency": "seconds of one prefill at batch b",
    "throughput": "decode tokens per second at batch b (a lower bound)",
}
BATCHED = ("memory", "decode_latency", "prefill_latency", "throughput")
OBJECTIVES = {"kl": False, "lm_loss": False, "cosine": False, "accuracy": True}  # name -> maximise?


@dataclass(frozen=True)
class Options:
    """Every layer's options as matrices for `solve`: keys[i][j] is layer i's option j ("i:name", or
    None past the layer's last option); scores and costs map a name to a float [L, K] (NaN where
    there is no option)."""

    keys: list
    scores: dict
    costs: dict

    def parent_choice(self) -> np.ndarray:
        return np.array([row.index(f"{i}:parent") for i, row in enumerate(self.keys)])

    def total(self, name: str, choice) -> float:
        table = self.costs[name] if name in self.costs else self.scores[name]
        return float(table[np.arange(len(choice)), np.asarray(choice)].sum())

    def restrict(self, keep) -> "Options":
        """The options for which `keep(key)` is true (each layer keeps its parent option)."""
        mask = np.array([[k is not None and (k.endswith(":parent") or bool(keep(k))) for k in row] for row in self.keys])
        keys = [[k if m else None for k, m in zip(row, ms)] for row, ms in zip(self.keys, mask)]
        return Options(keys, {n: np.where(mask, a, np.nan) for n, a in self.scores.items()},
                       {n: np.where(mask, a, np.nan) for n, a in self.costs.items()})


def tabulate(scores: Mapping[str, Mapping[str, float]], costs: Mapping[str, Mapping[str, float]]) -> Options:
    """Options from per-candidate records: scores[key][metric] and costs[key][cost], keys "layer:name".
    Every layer needs a "parent" option; every candidate needs the same metrics and costs."""
    if set(scores) != set(costs):
        odd = sorted(set(scores) ^ set(costs))
        raise ValueError(f"tabulate: candidates {odd[:5]} have scores but no costs or costs but no scores")
    by_layer: dict[int, list[str]] = {}
    for key in sorted(scores, key=lambda k: (int(k.split(":")[0]), k)):
        by_layer.setdefault(int(key.split(":")[0]), []).append(key)
    n_layers = max(by_layer) + 1
    missing = [i for i in range(n_layers) if f"{i}:parent" not in by_layer.get(i, [])]
    if missing:
        raise ValueError(f"tabulate: layers {missing} have no 'parent' option")
    width = max(len(v) for v in by_layer.values())
    keys = [by_layer[i] + [None] * (width - len(by_layer[i])) for i in range(n_layers)]

    def matrix(records, name):
        out = np.full((n_layers, width), np.nan)
        for i, row in enumerate(keys):
            for j, key in enumerate(row):
                if key is not None:
                    if name not in records[key]:
                        raise ValueError(f"tabulate: candidate {key} has no {name!r}")
                    out[i, j] = records[key][name]
        return out

    first = keys[0][0]
    return Options(keys, {n: matrix(scores, n) for n in scores[first]}, {n: matrix(costs, n) for n in costs[first]})


def _bounds(options: Options, budgets: Mapping[str, float], batch: int | None, relative: bool) -> dict[str, float]:
    """Bounds on cost columns for the budgets at batch size `batch`."""
    parent = options.parent_choice()
    bounds = {}
    for name, value in budgets.items():
        if name not in BUDGETS:
            raise ValueError(f"budget {name!r} is unknown; budgets: {', '.join(BUDGETS)}")
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"budget {name}={value!r}: must be a positive number")
        if name in BATCHED and batch is None:
            raise ValueError(f"budget {name!r} depends on the batch size: give batch_sizes")
        column = "decode_latency" if name == "throughput" else name
        column = f"{column}@{batch}" if name in BATCHED else column
        if column not in options.costs:
            have = sorted(options.costs)
            raise ValueError(f"budget {name!r} needs the cost {column!r}, which the cost table lacks; it has {have}")
        if name == "throughput":  # b / sum(latency) >= T  <=>  sum(latency) <= b / T
            bound = options.total(column, parent) / value if relative else batch / value
        else:
            bound = value * options.total(column, parent) if relative else value
        bounds[column] = min(bound, bounds.get(column, np.inf))
    return bounds


def search(options: Options, budgets: Mapping[str, float], *, objective: str = "kl", batch_sizes=(None,),
           relative: bool = True, k: int = 1, min_changed: int | None = None) -> list[dict]:
    """The best choice under `budgets` (name -> bound; with `relative`, a fraction of the parent's
    total, e.g. {"decode_latency": 0.5}), solved at every batch size in `batch_sizes` and kept at the
    one with the best objective; then k - 1 more choices, each differing from all earlier ones in at
    least `min_changed` layers (default: a fifth of the layers). Returns k records: batch size, option
    keys per layer, the summed objective and every cost's total and fraction of the parent's."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is unknown; objectives: {', '.join(OBJECTIVES)}")
    if objective not in options.scores:
        raise ValueError(f"objective {objective!r} is not in the score table; it has {sorted(options.scores)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}")
    n_layers = len(options.keys)
    min_changed = max(1, int(np.ceil(0.2 * n_layers))) if min_changed is None else min_changed
    maximize, scores = OBJECTIVES[objective], options.scores[objective]
    best, failures = None, []
    for batch in batch_sizes:
        bounds = _bounds(options, budgets, batch, relative)
        try:
            choice = solve(scores, options.costs, bounds, maximize=maximize)
        except Infeasible as err:
            failures.append(f"batch {batch}: {err}")
            continue
        value = options.total(objective, choice)
        if best is None or (value > best[0] if maximize else value < best[0]):
            best = (value, batch, bounds, choice)
    if best is None:
        raise Infeasible("; ".join(failures))
    _, batch, bounds, choice = best
    found = [choice]
    while len(found) < k:
        try:
            found.append(solve(scores, options.costs, bounds, maximize=maximize, avoid=found, min_changed=min_changed))
        except Infeasible:
            break  # fewer than k diverse choices fit
    parent = options.parent_choice()
    return [{"batch_size": batch, "objective": objective, "score": options.total(objective, c),
             "keys": [options.keys[i][j] for i, j in enumerate(c)], "choice": c.tolist(),
             "costs": {n: options.total(n, c) for n in options.costs},
             "relative": {n: options.total(n, c) / options.total(n, parent) for n in options.costs
                          if options.total(n, parent)}}
            for c in found]
