"""The user's cache folder for what csmf keeps between runs (stored selections, teachers' lists)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(*parts: str) -> Path:
    """$XDG_CACHE_HOME/csmf/<parts>, else ~/.cache/csmf/<parts> (not created here)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(root, "csmf", *parts)
