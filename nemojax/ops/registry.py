"""The `implementation=` switch every op's api.py shares: a table from names to functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping


def lookup(op: str, table: Mapping[str, Callable], implementation: str | None,
           default: Callable[[], str]) -> Callable:
    """table[implementation], or table[default()] for None; any other name is a ValueError that
    lists the names the op accepts."""
    name = default() if implementation is None else implementation
    if name not in table:
        raise ValueError(f"{op}: implementation must be None or one of {tuple(table)}; got {name!r}")
    return table[name]
