"""The static checks, run by the README's test command (so by .ci/run): ruff's lint and format check over src and
tests, and mypy over the core modules ([tool.mypy] in pyproject.toml names them and the settings)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECKS = {
    "ruff check": [sys.executable, "-m", "ruff", "check", "src", "tests"],
    "ruff format": [sys.executable, "-m", "ruff", "format", "--check", "src", "tests"],
    "mypy": [sys.executable, "-m", "mypy"],  # the files and settings come from pyproject.toml
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_static_check_passes(name):
    done = subprocess.run(CHECKS[name], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"`{' '.join(CHECKS[name][2:])}` failed (run it from the repository root to see and fix each finding; "
        f"`ruff format src tests` rewrites the formatting):\n{done.stdout}{done.stderr}"
    )


def test_mypy_checks_the_core_modules():
    """The type check covers the core modules: a config that lost them would pass while checking nothing."""
    files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    core = {"config", "rules", "masks", "prune", "metrics", "evaluation", "phases", "fusion", "retriever"}
    assert {f"src/csmf/{name}.py" for name in core} <= set(files)
    assert all((ROOT / f).is_file() for f in files), f"[tool.mypy] files names a missing file: {files}"
