"""The Puzzle baselines against brute force over the same option table."""

import itertools

import numpy as np
import pytest

from nemojax.compress import puzzle
from nemojax.compress.puzzle import baselines

NAMES = ["parent", "noop", "linear", "mlp_w75", "mlp_w50", "mlp_w25"]


def make_table(seed, n_layers=4):
    rng = np.random.default_rng(seed)
    scores, costs = {}, {}
    for i in range(n_layers):
        for j, name in enumerate(NAMES):
            width = baselines.width_fraction(name)
            key = f"{i}:{name}"
            scores[key] = {"kl": 0.0 if name == "parent" else float(rng.uniform(0, 1) + (1 - (width or 0)))}
            size = {"noop": 0.0, "linear": 0.05}.get(name, width)
            costs[key] = {"params": float(size * rng.uniform(0.8, 1.2)), "experts": 0.0}
    return scores, costs


def all_choices(options):
    rows = [[j for j, k in enumerate(row) if k is not None] for row in options.keys]
    return [np.array(c) for c in itertools.product(*rows)]


def fits(options, choice, budget):
    parent = options.total("params", options.parent_choice())
    return options.total("params", choice) <= budget * parent + 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_max_params_and_noop_only_equal_brute_force(seed):
    options = puzzle.tabulate(*make_table(seed))
    budget = {"params": 0.55}
    feasible = [c for c in all_choices(options) if fits(options, c, 0.55)]
    best_params = max(options.total("params", c) for c in feasible)
    assert options.total("params", baselines.max_params(options, budget)["choice"]) == pytest.approx(best_params)
    in_space = [c for c in feasible if all(options.keys[i][j].split(":")[1] in ("parent", "noop") for i, j in enumerate(c))]
    found = baselines.noop_only(options, budget)
    assert found["score"] == pytest.approx(min(options.total("kl", c) for c in in_space))
    assert {k.split(":")[1] for k in found["keys"]} <= {"parent", "noop"}


@pytest.mark.parametrize("seed", range(6))
def test_greedy_takes_each_layers_best_option_within_an_equal_share(seed):
    options = puzzle.tabulate(*make_table(seed))
    found = baselines.greedy(options, {"params": 0.6})
    share = 0.6 * options.total("params", options.parent_choice()) / len(options.keys)
    for i, j in enumerate(found["choice"]):
        within = [jj for jj, k in enumerate(options.keys[i]) if options.costs["params"][i, jj] <= share]
        assert j == min(within, key=lambda jj: options.scores["kl"][i, jj])
    assert fits(options, found["choice"], 0.6)
    assert found["score"] >= puzzle.search(options, {"params": 0.6})[0]["score"] - 1e-12  # the MIP is never worse


@pytest.mark.parametrize("seed", range(4))
def test_uniform_is_the_widest_single_fraction_that_fits(seed):
    options = puzzle.tabulate(*make_table(seed))
    found = baselines.uniform(options, {"params": 0.6})
    assert {k.split(":")[1] for k in found["keys"]} == {"parent" if found["fraction"] == 1 else
                                                        f"mlp_w{round(found['fraction'] * 100)}"}
    for f in (1.0, 0.75, 0.5, 0.25):  # every wider fraction breaks the budget
        if f > found["fraction"]:
            name = "parent" if f == 1 else f"mlp_w{round(f * 100)}"
            choice = [options.keys[i].index(f"{i}:{name}") for i in range(len(options.keys))]
            assert not fits(options, choice, 0.6)


def test_random_feasible_children_are_distinct_and_fit():
    options = puzzle.tabulate(*make_table(0))
    found = baselines.random_feasible(options, {"params": 0.5}, 20, seed=1)
    assert len(found) == 20 and len({tuple(f["choice"]) for f in found}) == 20
    assert all(fits(options, f["choice"], 0.5) for f in found)
