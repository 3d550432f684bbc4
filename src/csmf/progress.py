"""Progress bars on a terminal only: piped or logged output gets the plain log lines, not bar redraws."""

from __future__ import annotations

from tqdm import tqdm


def bar(iterable=None, progress: bool = True, **kwargs) -> tqdm:
    """tqdm when `progress` and stderr is a terminal (tqdm's disable=None), silent otherwise."""
    return tqdm(iterable, disable=None if progress else True, **kwargs)
