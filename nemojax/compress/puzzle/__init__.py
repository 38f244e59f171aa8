"""Puzzle for hybrid models: pick one option per layer under budgets (`solve`)."""

from nemojax.compress.puzzle.search import Infeasible, solve

__all__ = ["Infeasible", "solve"]
