"""Objective weights, in one place: their syntax, their rules, and the fold into the query vector.

The fold is the "one vector per item" claim (method notes §2, §7). Objective k scores with the output
dimensions owned by stages 1..k, so a fused score sum_k w_k * s_k(u, i) = <u * lambda, v_i> with
lambda_d = sum of w_k over the objectives k whose score uses dimension d (k >= owner(d)). One inner-product
search over one item matrix serves any weighting. The CLI, the HTTP service, export and the benchmarks all
parse weights with `parse_weights` (`view:1,purchase:0.5`), check them with `check_weights` and fold them
with `fold_weights` (numpy here, so the server does not load torch for it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np

MAX_WEIGHT = 1e6  # bound on one objective weight (float32 folds it exactly enough, never to inf)
MIN_WEIGHT_SUM = 1e-6  # weights summing to less rank by rounding noise (1e-300 folds to 0 in float32)
# a weight as text: ASCII digits only, so '1_0' and full-width digits are refused, not read as 10
WEIGHT_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class WeightError(ValueError):
    """Objective weights that cannot be used (the message says which rule they break)."""


def clip(text: str, limit: int = 80) -> str:
    """Text short enough to put in an error message (inputs are never echoed whole): clip(repr(value))."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def parse_weights(text: str, stages: tuple[str, ...]) -> dict[str, float]:
    """'click:0.3,purchase:0.7' -> {click: 0.3, purchase: 0.7}; the one syntax everywhere.

    Strict: a stage named twice, or a number Python would read leniently ('1_0', full-width digits, 'inf',
    'nan') is a WeightError, not a guess. Stage names are checked by check_weights.
    """
    weights: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip(" "):
            continue
        name, sep, value = part.partition(":")
        name, value = name.strip(" "), value.strip(" ")
        if not sep:
            raise WeightError(f"{clip(repr(part))} is not stage:weight (e.g. {stages[-1]}:0.7)")
        if name in weights:
            raise WeightError(f"stage {clip(repr(name))} is given twice; give each stage once")
        if not WEIGHT_NUMBER.fullmatch(value):
            raise WeightError(f"weight of {clip(repr(name))} is not a plain decimal number (ASCII digits, "
                              f"'.', an exponent): {clip(repr(value))}")  # fmt: skip
        weights[name] = float(value)
    return weights


def check_weights(weights: dict, stages: tuple[str, ...]) -> dict[str, float]:
    """Objective weights -> one float per stage (stages not named get 0), or WeightError saying what is wrong.

    The one set of rules for a request's weights, an artifact's default weights and the CLI's: known stage
    names, numbers (not booleans), 0 <= w <= MAX_WEIGHT, and a sum above MIN_WEIGHT_SUM. Weights are used as
    given, not normalised: a ranking does not change when every weight is scaled, and the bounds keep the
    fold q = u * lambda finite in float32.
    """
    if not isinstance(weights, dict) or not weights:
        raise WeightError(f"give at least one stage:weight; stages are {list(stages)}")
    for name, w in weights.items():
        if name not in stages:
            raise WeightError(f"unknown stage {clip(repr(name))}; stages are {list(stages)}")
        if isinstance(w, bool) or not isinstance(w, int | float):
            raise WeightError(f"weight of {name!r} must be a number, got {clip(repr(w))}")
        if not (math.isfinite(w) and 0 <= w <= MAX_WEIGHT):
            raise WeightError(f"weight of {name!r} must be between 0 and {MAX_WEIGHT:g}, got {w!r}")
    if math.fsum(weights.values()) <= MIN_WEIGHT_SUM:
        raise WeightError(f"weights sum to {math.fsum(weights.values())!r}: give a sum above {MIN_WEIGHT_SUM:g} "
                          "(all zero, or so small that float32 rounds them away, ranks by nothing)")  # fmt: skip
    return {s: float(weights.get(s, 0.0)) for s in stages}


def fold_weights(output_owner, weights: Mapping[int, float]):
    """(D,) float32 lambda for objective weights keyed by stage number (1-based); free dimensions get 0.
    `output_owner` is a numpy array or a torch tensor; lambda comes back as the same kind."""
    owner = output_owner.numpy() if hasattr(output_owner, "numpy") else np.asarray(output_owner)
    lam = np.zeros(len(owner), dtype=np.float32)
    for stage, w in weights.items():
        lam += np.float32(w) * ((owner >= 1) & (owner <= stage)).astype(np.float32)
    if hasattr(output_owner, "numpy"):
        import torch

        return torch.from_numpy(lam)
    return lam


def fold_named(output_owner, stages: tuple[str, ...], weights: Mapping[str, float]):
    """fold_weights for weights keyed by objective name (stage k is stages[k - 1])."""
    return fold_weights(output_owner, {stages.index(name) + 1: w for name, w in weights.items()})
