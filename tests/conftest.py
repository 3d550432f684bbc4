"""Shared fixtures: a small simulated cascade, the JD files, and the shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from csmf.config import SimConfig
from csmf.data.jd import jd_raw_matrices
from csmf.data.logtable import load_log
from csmf.data.simulate import simulate
from csmf.data.split import split_log

# /work/main/tests/conftest.py -> /work/shared/data locally; ../shared/data from the repo root in CI.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
JD_SHARED = SHARED_DATA / "jd-multibehavior"

SMALL_SIM = SimConfig(n_users=300, n_items=200)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: results must be bit-identical across processes (a BLAS
    reduction may split differently with another thread count), and on a busy 2-core machine OpenMP's
    spinning threads make each tiny matmul ~100x slower than single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def jd_shared_dir() -> Path:
    if not (JD_SHARED / "trn_pv.txt").exists():
        pytest.skip(f"shared JD data not found at {JD_SHARED} (expected ../shared/data next to the repo)")
    return JD_SHARED


@pytest.fixture(scope="session")
def jd_files():
    """The five packaged JD files as matrices. Read-only: tests must not mutate them."""
    return jd_raw_matrices(None)


@pytest.fixture(scope="session")
def sim_parquet(tmp_path_factory) -> tuple[Path, dict]:
    """A small simulated log (300 users x 200 items) and the counts the simulator returned."""
    path = tmp_path_factory.mktemp("sim") / "sim.parquet"
    counts = simulate(SMALL_SIM, path, progress=False)
    return path, counts


@pytest.fixture
def sim_log(sim_parquet):
    return load_log(sim_parquet[0])


@pytest.fixture
def sim_data(sim_log):
    return split_log(sim_log, test_frac=0.2, valid_frac=0.1, seed=0, by="random", name="sim")


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Stored selections (csmf.selection) go to a folder of this test session, never the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    mp.undo()
