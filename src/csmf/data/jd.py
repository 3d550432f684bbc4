"""Loader for the JD multi-behaviour data (view -> favorite -> purchase).

Reads the five published files (never `union.txt`, which holds validation and test pairs) from a
folder, or from the xz-compressed copy shipped inside the package (see datasets/jd/ATTRIBUTION.md).
"""

from __future__ import annotations

import lzma
from importlib import resources
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from csmf.data.errors import DataError
from csmf.data.schema import CascadeData, LoadReport, pairs_to_csr
from csmf.data.split import JD_DEFAULT_STAGES, split_jd

JD_FILES = ("trn_pv", "trn_fav", "trn_buy", "vld_buy", "tst_buy")
MAX_ID = 2**62  # ids are held as int64
# JD ids are dense (1..N), so an id is its index; when the largest id is this much above the number of
# distinct ids (a stray 5,000,000 among 13k items), the ids are remapped to 0..n-1 and the report says so,
# rather than building a catalogue of millions of empty items
SPARSE_IDS = 2
SPARSE_SLACK = 1000


def _open_text(path: Path) -> str:
    if path.suffix == ".xz":
        with lzma.open(path, "rt") as fh:
            return fh.read()
    return path.read_text()


def read_pair_file(path: Path, text: str | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Parse `user item` lines (1-based integer ids) into 0-based arrays.

    Returns (users, items, blank_lines). Any malformed line raises DataError naming the file and line.
    """
    text = _open_text(path) if text is None else text
    lines = text.splitlines()
    users = np.empty(len(lines), dtype=np.int64)
    items = np.empty(len(lines), dtype=np.int64)
    kept = 0
    blank = 0
    for lineno, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            blank += 1
            continue
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected 2 fields 'user_id item_id', got {len(parts)}: {line!r}")
        try:
            u, i = int(parts[0]), int(parts[1])
        except ValueError:
            raise DataError(f"{path}:{lineno}: ids must be integers, got {line!r}") from None
        if u > MAX_ID or i > MAX_ID:
            raise DataError(f"{path}:{lineno}: ids must be at most {MAX_ID:,}, got {line!r}")
        if u < 1 or i < 1:
            raise DataError(f"{path}:{lineno}: ids must be >= 1 (JD ids are 1-based), got {line!r}")
        users[kept], items[kept] = u - 1, i - 1
        kept += 1
    return users[:kept], items[:kept], blank


def packaged_jd_dir() -> Path:
    return Path(str(resources.files("csmf") / "datasets" / "jd"))


def _locate(folder: Path | None, stem: str) -> Path:
    folder = folder or packaged_jd_dir()
    for candidate in (folder / f"{stem}.txt", folder / f"{stem}.txt.xz"):
        if candidate.exists():
            return candidate
    raise DataError(f"JD file {stem}.txt (or {stem}.txt.xz) not found in {folder}")


def jd_raw_matrices(folder: str | Path | None = None, report: LoadReport | None = None) -> dict[str, sp.csr_matrix]:
    """The five JD files as 0/1 user x item matrices, unsplit. Repeats and blank lines go to `report`."""
    return jd_raw(folder, report)[0]


def _index(ids: list[np.ndarray], kind: str, report: LoadReport) -> tuple[list[np.ndarray], np.ndarray]:
    """0-based ids -> (indices, original 1-based id per index): the id itself while ids are dense."""
    distinct = np.unique(np.concatenate(ids))
    top = int(distinct[-1]) + 1
    if top <= SPARSE_IDS * len(distinct) + SPARSE_SLACK:
        return ids, np.arange(1, top + 1)
    report.notes.append(
        f"{kind} ids go up to {top:,} but only {len(distinct):,} are used: remapped to 1..{len(distinct):,} "
        "(the original ids are kept for serving)"
    )
    return [np.searchsorted(distinct, x) for x in ids], distinct + 1


def jd_raw(
    folder: str | Path | None = None, report: LoadReport | None = None
) -> tuple[dict[str, sp.csr_matrix], np.ndarray, np.ndarray]:
    """The five JD files as matrices, and the original user and item id of each index."""
    folder = Path(folder) if folder else None
    report = report or LoadReport("jd")
    raw = {}
    for stem in JD_FILES:
        path = _locate(folder, stem)
        users, items, blank = read_pair_file(path)
        report.rows_read += len(users)
        report.skip(f"blank lines in {path.name}", blank)
        raw[stem] = (users, items)
    stems = list(raw)
    users, user_ids = _index([raw[s][0] for s in stems], "user", report)
    items, item_ids = _index([raw[s][1] for s in stems], "item", report)
    raw = {s: (u, i) for s, u, i in zip(stems, users, items, strict=True)}
    n_users, n_items = len(user_ids), len(item_ids)
    files = {}
    for stem, (users, items) in raw.items():
        if len(users) == 0:
            raise DataError(f"JD file {_locate(folder, stem)} has no pairs")
        files[stem] = pairs_to_csr(users, items, n_users, n_items)
        repeats = len(users) - files[stem].nnz
        if repeats:
            report.duplicate_pairs += repeats
            report.notes.append(f"{stem}: {repeats} repeated pairs counted once")
    return files, user_ids, item_ids


def load_jd(
    folder: str | Path | None = None,
    stages: tuple[str, ...] = JD_DEFAULT_STAGES,
    test_frac: float = 0.2,
    valid_frac: float = 0.1,
    seed: int = 0,
) -> CascadeData:
    """Load and split JD. `folder=None` reads the copy shipped in the package."""
    report = LoadReport(f"jd ({folder or 'packaged copy'})")
    files, user_ids, item_ids = jd_raw(folder, report)
    data = split_jd(files, stages=tuple(stages), test_frac=test_frac, valid_frac=valid_frac, seed=seed, report=report)
    data.user_ids, data.item_ids = user_ids, item_ids
    return data
