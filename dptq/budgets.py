"""Budgets (docs/method.md §2.6): the total bits C that every example's allocation must hit exactly.

C = round((a + d_v) · N), ``a`` the budget level (A, B, C), ``d_v`` the version's offset and N the
number of quantizable layers; ``round`` is Python's (half to even). A cell is feasible when some
choice of one option per layer sums to C, which for a contiguous option range is
N·min ≤ C ≤ N·max.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence


def options(low: int, high: int) -> list[int]:
    """The bit-width options of a version ``[low, high]``, inclusive."""
    return list(range(int(low), int(high) + 1))


def capacity(num_layers: int, level: float, offset: float) -> int:
    return int(round((level + offset) * num_layers))


@functools.cache
def _reachable(num_layers: int, opts: tuple[int, ...]) -> frozenset[int]:
    totals = {0}
    for _ in range(num_layers):
        totals = {t + o for t in totals for o in opts}
    return frozenset(totals)


def check_feasible(num_layers: int, opts: Sequence[int], cap: int, where: str = "") -> None:
    """Raise ``ValueError`` naming N, the options and C when no allocation sums to C."""
    if cap not in _reachable(int(num_layers), tuple(sorted(set(int(o) for o in opts)))):
        raise ValueError(
            f"{where + ': ' if where else ''}no allocation of N={num_layers} layers with options "
            f"{list(opts)} sums to capacity {cap} (reachable: {num_layers * min(opts)}.."
            f"{num_layers * max(opts)})")


def cell(num_layers: int, bit_range: Sequence[int], level: float, offset: float, where: str = "") -> tuple[list[int], int]:
    """Options and capacity of one cell: a version's ``bit_range`` [low, high], a budget ``level``
    and the version's ``offset``, checked for feasibility."""
    opts = options(*bit_range)
    cap = capacity(num_layers, level, offset)
    check_feasible(num_layers, opts, cap, where=where)
    return opts, cap

