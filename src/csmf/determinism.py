"""Same seed, same weights: training runs with torch's deterministic algorithms switched on.

With more than one CPU thread, some backward passes (embedding and index-add reductions) sum in an order
that varies from run to run, so two runs with one seed drift apart in the last bits and then in the
metrics. Deterministic mode fixes the order; the flags are restored afterwards, so importing or calling
csmf never changes them for the caller's own code.

Deterministic mode also fills every freshly allocated tensor with NaN by default (a guard against reading
uninitialised memory, which csmf never does): that fill cost ~4% of a multi-task training step on JD
(profiled), so it is switched off.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def deterministic_torch(warn_only: bool = False) -> Iterator[None]:
    """warn_only: an operation without a deterministic kernel warns instead of failing (on a GPU)."""
    before = torch.are_deterministic_algorithms_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS asks for; CPU ignores it
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.utils.deterministic.fill_uninitialized_memory = fill_before


@contextmanager
def order_free() -> Iterator[None]:
    """Deterministic mode off for the block (and its flags restored after): for writes whose result cannot depend on
    their order, such as index_copy_ to distinct rows, where the mode's kernel for repeated indices only costs time."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's default generators seeded with `seed` for the block, and the caller's state restored after it.

    For what draws from the default generator and takes no generator of its own (dropout, nn.Linear's initial
    weights); everything else draws from a torch.Generator it is handed. A fit thus neither reads nor moves
    the caller's random state. Only GPUs torch has already started are forked: forking starts every GPU (slow,
    and memory on each), while one started inside the block draws from the seed manual_seed queued for it."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
