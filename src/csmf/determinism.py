"""Same seed, same weights: training runs with torch's deterministic algorithms switched on.

With more than one CPU thread, some backward passes (embedding and index-add reductions) sum in an order
that varies from run to run, so two runs with one seed drift apart in the last bits and then in the
metrics. Deterministic mode fixes the order; the flag is restored afterwards, so importing or calling
csmf never changes it for the caller's own code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def deterministic_torch() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
