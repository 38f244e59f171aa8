"""Puzzle for hybrid models: pick one option per layer under budgets (`solve`, and `search` over
named budgets and batch sizes on a table of candidates' scores and costs)."""

from nemojax.compress.puzzle.search import BUDGETS, OBJECTIVES, Infeasible, Options, search, solve, tabulate

__all__ = ["BUDGETS", "OBJECTIVES", "Infeasible", "Options", "search", "solve", "tabulate"]
