"""Hyper-parameter selection on validation only: coordinate search over a grid, per objective.

Full grids grow multiplicatively (ALS: 3 x 3 x 3 x 4 = 108 fits per objective); coordinate search
sweeps one parameter at a time with the others at their current best and repeats until nothing
changes, which finds the same optimum on these smooth grids in a fraction of the fits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from csmf.progress import bar


@dataclass
class SearchResult:
    best: dict[str, Any]
    best_value: float
    trials: list[dict[str, Any]] = field(default_factory=list)  # {"params": {...}, "value": x}
    capped: bool = False  # stopped at max_fits before the search converged

    def as_dict(self, metric: str) -> dict:
        out = {"metric": metric, "best": self.best, "best_value": self.best_value, "trials": self.trials}
        return out | ({"capped": True} if self.capped else {})


def coordinate_search(
    grid: Mapping[str, Sequence[Any]],
    objective: Callable[[dict[str, Any]], float],
    start: Mapping[str, Any],
    max_rounds: int = 3,
    progress: bool = False,
    desc: str = "tune",
    max_fits: int = 0,
) -> SearchResult:
    """Maximise `objective` over `grid`, one coordinate at a time, starting from `start`.

    Each distinct point is evaluated once. Ties keep the incumbent, so the result is deterministic. max_fits > 0:
    stop after that many evaluations (the points in the search's order), keeping the best so far.
    """
    current = dict(start)
    cache: dict[tuple, float] = {}
    trials: list[dict[str, Any]] = []
    fits = bar(None, progress, desc=desc, unit="fit", leave=False)

    def key(point: dict[str, Any]) -> tuple:
        return tuple(sorted(point.items()))

    def value(point: dict[str, Any]) -> float:
        k = key(point)
        if k not in cache:
            cache[k] = float(objective(dict(point)))
            trials.append({"params": dict(point), "value": cache[k]})
            fits.update(1)
            fits.set_postfix(best=f"{max(cache.values()):.4f}")
        return cache[k]

    best_value = value(current)
    for _ in range(max_rounds):
        changed = False
        for name, values in grid.items():
            for candidate in values:
                point = {**current, name: candidate}
                if max_fits and len(cache) >= max_fits and key(point) not in cache:
                    fits.close()
                    return SearchResult(best=current, best_value=best_value, trials=trials, capped=True)
                v = value(point)
                if v > best_value:
                    current, best_value, changed = point, v, True
        if not changed:
            break
    fits.close()
    return SearchResult(best=current, best_value=best_value, trials=trials)
