"""Puzzle's architecture search: one option per layer, best total score under summed-cost budgets,
as a mixed-integer linear program solved by HiGHS (`scipy.optimize.milp`).

Variables x[i, j] in {0, 1} (layer i takes option j); exactly one option per layer; for every budget
sum_ij cost[i, j] x[i, j] <= bound; for every earlier choice y to avoid, the new choice keeps at most
L - min_changed of y's options (it differs from y in at least `min_changed` layers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
        rows.append(cost[name].ravel())
        lower.append(-np.inf)
        upper.append(float(bound))
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
