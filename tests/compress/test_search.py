"""puzzle.solve against brute-force enumeration of every choice on small random instances."""

import itertools
import re

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


@pytest.mark.parametrize("seed", range(12))
def test_budgets_hold_at_any_scale_of_the_costs(seed):
    """Costs in seconds of a microsecond-scale layer (1e-9..1e-6) hold their budgets as unit costs do:
    the solver's absolute feasibility tolerance (1e-7) would otherwise loosen them."""
    rng = np.random.default_rng(500 + seed)
    scores, costs, budgets = instance(rng, 4, 3, n_budgets=2)
    scale = 10.0 ** -rng.integers(6, 10)
    small = {n: c * scale for n, c in costs.items()}
    tight = {n: b * scale for n, b in budgets.items()}
    best = brute_force(scores, small, tight)
    if best is None:
        with pytest.raises(puzzle.Infeasible):
            puzzle.solve(scores, small, tight)
        return
    choice = puzzle.solve(scores, small, tight)
    rows = np.arange(4)
    assert scores[rows, choice].sum() == pytest.approx(best)
    for name, bound in tight.items():
        assert small[name][rows, choice].sum() <= bound * (1 + 1e-9), name


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


def table(rng, n_layers, n_options, batch_sizes):
    """Random per-candidate records as score.py writes them: layer i's options i:parent, i:o1, ..."""
    scores, costs = {}, {}
    for i in range(n_layers):
        for j in range(int(rng.integers(1, n_options + 1))):
            key = f"{i}:parent" if j == 0 else f"{i}:o{j}"
            scores[key] = {"kl": 0.0 if j == 0 else float(rng.uniform(0, 1)), "accuracy": float(rng.uniform(0, 1))}
            costs[key] = {"params": float(rng.uniform(1, 2) if j == 0 else rng.uniform(0, 1.5))}
            for b in batch_sizes:
                costs[key][f"decode_latency@{b}"] = float(rng.uniform(0.5, 1.0) * (1 + 0.1 * b) * (1.2 if j == 0 else 1))
    return scores, costs


def brute_force_search(scores, costs, feasible, objective="kl", maximize=False):
    n_layers = 1 + max(int(k.split(":")[0]) for k in scores)
    per_layer = [[k for k in scores if k.startswith(f"{i}:")] for i in range(n_layers)]
    best = None
    for keys in itertools.product(*per_layer):
        if feasible(keys):
            value = sum(scores[k][objective] for k in keys)
            if best is None or (value > best if maximize else value < best):
                best = value
    return best


@pytest.mark.parametrize("seed", range(12))
def test_search_over_batch_sizes_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    batch_sizes = (1, 8)
    scores, costs = table(rng, int(rng.integers(2, 5)), 4, batch_sizes)
    options = puzzle.tabulate(scores, costs)
    parent = [k for k in scores if k.endswith(":parent")]
    frac = {"decode_latency": float(rng.uniform(0.6, 0.95)), "params": float(rng.uniform(0.5, 1.0))}
    objective = ("kl", "accuracy")[seed % 2]

    def feasible_at(b):
        return lambda keys: all(sum(costs[k][col] for k in keys) <= f * sum(costs[k][col] for k in parent) + 1e-9
                                for col, f in ((f"decode_latency@{b}", frac["decode_latency"]), ("params", frac["params"])))

    per_batch = [brute_force_search(scores, costs, feasible_at(b), objective, seed % 2) for b in batch_sizes]
    reachable = [v for v in per_batch if v is not None]
    if not reachable:
        with pytest.raises(puzzle.Infeasible):
            puzzle.search(options, frac, objective=objective, batch_sizes=batch_sizes)
        return
    (found,) = puzzle.search(options, frac, objective=objective, batch_sizes=batch_sizes)
    assert found["score"] == pytest.approx(max(reachable) if seed % 2 else min(reachable))
    assert feasible_at(found["batch_size"])(found["keys"])
    assert found["relative"]["params"] <= frac["params"] + 1e-9


def test_throughput_and_absolute_budgets():
    rng = np.random.default_rng(7)
    scores, costs = table(rng, 4, 4, (4,))
    options = puzzle.tabulate(scores, costs)
    parent_latency = sum(costs[f"{i}:parent"]["decode_latency@4"] for i in range(4))
    (rel,) = puzzle.search(options, {"throughput": 1.25}, batch_sizes=(4,))
    assert 4 / rel["costs"]["decode_latency@4"] >= 1.25 * 4 / parent_latency - 1e-9
    tokens_per_s = 1.25 * 4 / parent_latency
    (absolute,) = puzzle.search(options, {"throughput": tokens_per_s}, batch_sizes=(4,), relative=False)
    assert absolute["keys"] == rel["keys"]


def test_diverse_solutions_differ_in_enough_layers():
    rng = np.random.default_rng(3)
    scores, costs = table(rng, 6, 5, ())
    found = puzzle.search(puzzle.tabulate(scores, costs), {"params": 0.8}, k=4, min_changed=2)
    assert len(found) >= 2
    for a, b in itertools.combinations(found, 2):
        assert sum(x != y for x, y in zip(a["keys"], b["keys"])) >= 2
    assert [f["score"] for f in found] == sorted(f["score"] for f in found)  # each is the best of what is left


@pytest.mark.parametrize("budgets, kwargs, needle", [
    ({"latency": 0.5}, {}, "budget 'latency' is unknown"),
    ({"params": -1.0}, {}, "budget params=-1.0"),
    ({"memory": 0.5}, {}, "depends on the batch size"),
    ({"memory": 0.5}, {"batch_sizes": (2,)}, "needs the cost 'memory@2'"),
    ({"params": 0.5}, {"objective": "ppl"}, "objective 'ppl' is unknown"),
])
def test_search_bad_budgets_name_the_budget(budgets, kwargs, needle):
    scores, costs = table(np.random.default_rng(0), 3, 3, ())
    with pytest.raises(ValueError, match=re.escape(needle)):
        puzzle.search(puzzle.tabulate(scores, costs), budgets, **kwargs)


def test_tabulate_needs_a_parent_option_per_layer():
    scores, costs = table(np.random.default_rng(0), 3, 3, ())
    del scores["1:parent"], costs["1:parent"]
    with pytest.raises(ValueError, match=r"layers \[1\] have no 'parent' option"):
        puzzle.tabulate(scores, costs)
