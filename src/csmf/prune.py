"""Pruning criteria as pure functions: unit magnitudes + owners in, new owners out.

CPP (cumulative percentile pruning, method notes §4): among the current stage's units of one layer,
sort by magnitude ascending and free the smallest units whose cumulative L1 mass is <= tau of the
stage's total mass in that layer. Fixed-percentage magnitude pruning (PackNet) frees a fixed fraction
of the stage's units per layer instead; it is the "w/o CPP" ablation.
"""

from __future__ import annotations

import torch


def cpp_free(magnitude: torch.Tensor, owner: torch.Tensor, stage: int, tau: float, min_free: int = 0) -> torch.Tensor:
    """Bool mask of units to free by CPP: stage units whose ascending cumulative mass is <= tau * total.

    `magnitude[j]` is unit j's information: the L1 norm of its usable incoming weights (or of an
    embedding column). Only units owned by `stage` are candidates; at least one stays owned, and at
    least `min_free` are freed (the smallest) so a following stage always gets room in this group.
    """
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    candidates = torch.nonzero(owner == stage).flatten()
    free = torch.zeros_like(owner, dtype=torch.bool)
    if len(candidates) <= 1:
        return free
    mass = magnitude[candidates].double()
    order = torch.argsort(mass, stable=True)  # ascending: low-information units first
    cumulative = torch.cumsum(mass[order], dim=0)
    pruned = cumulative <= tau * cumulative[-1]
    pruned[: min(min_free, len(candidates) - 1)] = True
    pruned[-1] = False  # the largest unit always stays: a stage never loses a whole layer
    free[candidates[order[pruned]]] = True
    return free


def fixed_free(
    magnitude: torch.Tensor, owner: torch.Tensor, stage: int, fraction: float, min_free: int = 0
) -> torch.Tensor:
    """Bool mask of units to free by PackNet's rule: the smallest `fraction` of the stage's units."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    candidates = torch.nonzero(owner == stage).flatten()
    free = torch.zeros_like(owner, dtype=torch.bool)
    n_free = min(max(int(round(fraction * len(candidates))), min_free), len(candidates) - 1)
    if n_free <= 0:
        return free
    order = torch.argsort(magnitude[candidates].double(), stable=True)
    free[candidates[order[:n_free]]] = True
    return free


def release(owner: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """New owners: freed units become 0 (free for the next stage)."""
    return torch.where(free, torch.zeros_like(owner), owner)
