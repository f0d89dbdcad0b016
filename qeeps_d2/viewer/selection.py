"""Which queries the results viewer renders: chosen, sampled, the worst, or all (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["QuerySelection", "parse_query_list", "select_queries"]


@dataclass(frozen=True)
class QuerySelection:
    """One way of choosing queries (set exactly one of ``queries``, ``sample``, ``worst``,
    ``all``; nothing set means ``sample=20``).

    Attributes:
        queries: these query indices, in this order.
        sample: this many queries drawn at random (``seed``), shown in index order.
        seed: the sampling seed.
        worst: this many queries of lowest AP (of the first model), lowest first; ties by index.
        all: every query, in index order.
    """

    queries: Optional[Sequence[int]] = None
    sample: Optional[int] = None
    seed: int = 0
    worst: Optional[int] = None
    all: bool = False

    def describe(self) -> str:
        """A few words for the page ("20 sampled queries (seed 0)")."""
        if self.queries is not None:
            return f"{len(self.queries)} chosen queries"
        if self.worst is not None:
            return f"the {self.worst} queries of lowest AP"
        if self.all:
            return "every query"
        count = self.sample if self.sample is not None else 20
        return f"{count} sampled queries (seed {self.seed})"


def parse_query_list(text: str) -> List[int]:
    """``"0,5,17"`` -> ``[0, 5, 17]`` (duplicates dropped, order kept).

    Raises:
        ValueError: an item that is not a non-negative integer.
    """
    out: List[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ValueError(f"--queries: {item!r} is not a query index (use e.g. 0,5,17)")
        if int(item) not in out:
            out.append(int(item))
    return out


def select_queries(available: Sequence[int], ap: Mapping[int, float],
                   selection: QuerySelection) -> List[int]:
    """The query indices to render.

    Args:
        available: the queries that can be shown (those of the results file(s)).
        ap: query index -> AP (used by ``worst``).
        selection: how to choose.

    Returns:
        query indices, in the order they are shown.

    Raises:
        ValueError: a chosen query that is not available, or a count below 1.
    """
    pool = sorted(int(q) for q in available)
    chosen = [s is not None for s in (selection.queries, selection.sample, selection.worst)]
    if sum(chosen) + bool(selection.all) > 1:
        raise ValueError("choose the queries one way: queries, sample, worst or all")
    if selection.queries is not None:
        known = set(pool)
        for q in selection.queries:
            if q not in known:
                span = f"{len(pool)} queries, {pool[0]}-{pool[-1]}" if pool else "no query"
                raise ValueError(f"--queries: query {q} is not in the results (they hold {span})")
        return list(dict.fromkeys(int(q) for q in selection.queries))
    if selection.all:
        return pool
    for name, count in (("--sample", selection.sample), ("--worst", selection.worst)):
        if count is not None and count < 1:
            raise ValueError(f"{name} must be at least 1, got {count}")
    if selection.worst is not None:
        return sorted(pool, key=lambda q: (ap[q], q))[: selection.worst]
    size = min(selection.sample if selection.sample is not None else 20, len(pool))
    picked = np.random.RandomState(selection.seed).choice(pool, size=size, replace=False)
    return sorted(int(q) for q in picked)
