"""What every sampled-softmax batch needs, written once: item frequencies for the logQ correction and
uniformly drawn extra negatives with theirs (Yi et al., RecSys 2019, sampling-bias-corrected softmax)."""

from __future__ import annotations

import numpy as np
import torch


def log_q(items: np.ndarray, n_items: int) -> torch.Tensor:
    """(N,) log of each item's share of the training pairs (+1 smoothing): its in-batch sampling rate."""
    return log_q_from_counts(np.bincount(items, minlength=n_items))


def log_q_from_counts(counts: np.ndarray) -> torch.Tensor:
    """log_q from per-item training counts (a streamed cache keeps them, not the pairs)."""
    counts = counts.astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def uniform_negatives(n_items: int, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(count,) item ids drawn uniformly, and their logQ correction log(count / N)."""
    ids = torch.randint(0, n_items, (count,), generator=generator)
    return ids, torch.full((count,), float(np.log(count / n_items)))
