"""puzzle.solve against brute-force enumeration of every choice on small random instances."""

import itertools

import numpy as np
import pytest

from nemojax.compress import puzzle


def brute_force(scores, costs, budgets, maximize=False, avoid=(), min_changed=0):
    """(best objective, feasible?) over all option tuples, or (None, False) when nothing fits."""
    n_layers, n_options = scores.shape
    best = None
    for choice in itertools.product(range(n_options), repeat=n_layers):
        c = np.array(choice)
        picked = scores[np.arange(n_layers), c]
        if np.isnan(picked).any():
            continue
        if any(costs[n][np.arange(n_layers), c].sum() > b for n, b in budgets.items()):
            continue
        if any(np.sum(c != np.asarray(y)) < min_changed for y in avoid):
            continue
        value = picked.sum()
        if best is None or (value > best if maximize else value < best):
            best = value
    return best


def instance(rng, n_layers, n_options, n_budgets):
    scores = rng.normal(size=(n_layers, n_options))
    scores[rng.random(scores.shape) < 0.25] = np.nan
    scores[np.arange(n_layers), rng.integers(0, n_options, n_layers)] = rng.normal(size=n_layers)  # >= 1 option
    costs = {f"c{k}": rng.uniform(0.1, 1.0, scores.shape) for k in range(n_budgets + 1)}
    lo = {n: np.nanmin(np.where(np.isnan(scores), np.nan, c), 1).sum() for n, c in costs.items()}
    hi = {n: np.nanmax(np.where(np.isnan(scores), np.nan, c), 1).sum() for n, c in costs.items()}
    budgets = {n: lo[n] + rng.uniform(0.2, 0.8) * (hi[n] - lo[n]) for n in list(costs)[:n_budgets]}
    return scores, costs, budgets


@pytest.mark.parametrize("seed", range(40))
def test_solve_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_layers, n_options = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    scores, costs, budgets = instance(rng, n_layers, n_options, n_budgets=int(rng.integers(0, 3)))
    maximize = bool(seed % 2)
    avoid = [rng.integers(0, n_options, n_layers) for _ in range(int(rng.integers(0, 3)))]
    min_changed = int(rng.integers(0, n_layers + 1)) if avoid else 0
    best = brute_force(scores, costs, budgets, maximize, avoid, min_changed)
    if best is None:
        with pytest.raises(puzzle.Infeasible):
            puzzle.solve(scores, costs, budgets, maximize=maximize, avoid=avoid, min_changed=min_changed)
        return
    choice = puzzle.solve(scores, costs, budgets, maximize=maximize, avoid=avoid, min_changed=min_changed)
    rows = np.arange(n_layers)
    assert choice.shape == (n_layers,) and not np.isnan(scores[rows, choice]).any()
    for name, bound in budgets.items():
        assert costs[name][rows, choice].sum() <= bound + 1e-7, name
    for y in avoid:
        assert np.sum(choice != y) >= min_changed
    assert abs(scores[rows, choice].sum() - best) < 1e-9


def test_infeasible_names_the_budgets_and_what_they_can_reach():
    scores = np.zeros((3, 2))
    costs = {"decode_latency": np.array([[1.0, 2.0], [1.0, 2.0], [0.5, 3.0]])}
    with pytest.raises(puzzle.Infeasible, match=r"decode_latency <= 2 \(least reachable 2.5\)"):
        puzzle.solve(scores, costs, {"decode_latency": 2.0})
    assert isinstance(puzzle.Infeasible("x"), ValueError)


def test_diversity_alone_can_be_infeasible():
    scores = np.array([[0.0, np.nan], [0.0, 1.0]])  # layer 0 has one option: two changes are impossible
    with pytest.raises(puzzle.Infeasible, match="differing from 1 earlier choice"):
        puzzle.solve(scores, {}, {}, avoid=[np.array([0, 0])], min_changed=2)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(budgets={"memory": 1.0}), "budgets ['memory'] have no cost array"),
    (dict(costs={"params": np.ones((2, 3))}), "cost 'params' has shape (2, 3)"),
    (dict(scores=np.full((2, 2), np.nan)), "layers [0, 1] have no option"),
    (dict(min_changed=5), "min_changed must be an int in [0, 2]"),
    (dict(avoid=[np.array([0, 7])], min_changed=1), "avoid[0] must be an int array"),
    (dict(costs={"params": np.array([[1.0, np.inf], [1.0, 1.0]])}), "cost 'params' is not finite at (layer, option) (0, 1)"),
])
def test_bad_input_names_the_field(kwargs, needle):
    args = dict(scores=np.zeros((2, 2)), costs={}, budgets={}) | kwargs
    with pytest.raises(ValueError) as err:
        puzzle.solve(args.pop("scores"), args.pop("costs"), args.pop("budgets"), **args)
    assert needle in str(err.value)
