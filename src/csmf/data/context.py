"""Per-row context (scenario, hour, page): what a request knows about itself before it is answered.

A context column takes one value per logged row, not per user or item. Each (user, item) pair keeps the
value of its latest row (by timestamp, else the last in the file); values become codes 1..K per column,
code 0 meaning "unknown". The user tower embeds the codes (csmf.backbones.mlp), so one user has a vector per
context; the item index is unchanged.

Evaluation with context ranks per request: a request is a (user, context) pair, its positives the user's
held-out items logged in that context (`requests`). That is the impression-level protocol of the public
logs: the context is known when the request is made.

Why explicit: a column that changes from row to row is as likely an outcome (a play time, a dwell time)
as a context, and an outcome fed to the user tower leaks the label. So context columns are named
(data.context_features), and only the public layouts name defaults (Ali-CCP's scenario field 301,
KuaiRand's tab, the simulator's scenario).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from csmf.data.errors import DataError


def encode(values: np.ndarray, unknown: np.ndarray | None = None) -> np.ndarray:
    """Codes 1..K for per-pair values (numbers, or a text column's dictionary codes), one per distinct value;
    code 0 where `unknown` (an empty cell)."""
    known = np.ones(len(values), dtype=bool) if unknown is None else ~np.asarray(unknown, dtype=bool)
    codes = np.zeros(len(values), dtype=np.int64)
    if known.any():
        _, inverse = np.unique(values[known], return_inverse=True)
        codes[known] = inverse.reshape(-1) + 1
    return codes


def latest_per_pair(values: np.ndarray, order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The value of each pair's last row: `order` sorts rows by pair (then time), `starts` opens each pair."""
    ends = np.r_[starts[1:], len(order)] - 1
    return values[order[ends]]


def matrices(
    context: dict[str, np.ndarray], users: np.ndarray, items: np.ndarray, n_users: int, n_items: int
) -> dict[str, sp.csr_matrix]:
    """users x items int64 matrices of per-pair codes, one per column (a pair absent is code 0)."""
    out = {}
    for name, codes in context.items():
        mat = sp.csr_matrix((codes.astype(np.int64), (users, items)), shape=(n_users, n_items), dtype=np.int64)
        mat.sort_indices()
        out[name] = mat
    return out


def sizes(context: dict[str, sp.csr_matrix]) -> dict[str, int]:
    """Rows of each column's embedding table: its codes plus code 0 (unknown)."""
    return {name: int(mat.data.max(initial=0)) + 1 for name, mat in context.items()}


def lookup(context: dict[str, sp.csr_matrix], users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
    """Each column's code of every (user, item) pair; 0 where the pair was never logged. Looked up in blocks, as
    int32 where the codes fit: a phase keeps them beside its pairs (30M at 42M rows), and scipy's fancy index
    makes int64 copies of the block's ids."""
    out = {}
    block = 1 << 22
    for name, mat in context.items():
        dtype = np.int32 if mat.nnz == 0 or (mat.data.min() >= -(2**31) and mat.data.max() < 2**31) else np.int64
        codes = np.empty(len(users), dtype=dtype)
        for start in range(0, len(users), block):
            part = slice(start, start + block)
            codes[part] = np.asarray(mat[users[part], items[part]]).ravel()
        out[name] = codes
    return out


def wanted(named: tuple[str, ...] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """The context columns asked for: the named ones (data.context_features), or, when None, the layout's
    `default` (read where the files have them)."""
    return tuple(default if named is None else named)


def resolve(named: tuple[str, ...] | None, default: tuple[str, ...], columns) -> tuple[str, ...]:
    """The context columns to read: the named ones, or those of the layout's `default` that the files have."""
    return wanted(named, tuple(c for c in default if c in columns))


def check_columns(names: tuple[str, ...], columns: list[str], path: str, taken: set[str]) -> None:
    """Named context columns exist and are not also ids, stages or features."""
    for name in names:
        if name not in columns:
            raise DataError(f"{path}: context column {name!r} (data.context_features) not found; columns are {columns}")
        if name in taken:
            raise DataError(f"{path}: column {name!r} is named as context but is an id, stage or feature column")


@dataclass
class Requests:
    """Evaluation requests of one stage: request r is user `users[r]` in context `codes[name][r]`."""

    users: np.ndarray  # (R,) int64
    codes: dict[str, np.ndarray]  # column -> (R,) int64
    truth: sp.csr_matrix  # (R, N) the request's held-out positives


def requests(test: sp.csr_matrix, context: dict[str, sp.csr_matrix]) -> Requests:
    """Group a stage's test pairs by (user, context): one request per distinct combination."""
    coo = test.tocoo()
    users, items = coo.row.astype(np.int64), coo.col.astype(np.int64)
    codes = lookup(context, users, items)
    names = sorted(codes)
    keys = np.stack([users] + [codes[n] for n in names], axis=1)  # (P, 1 + C)
    unique, request = np.unique(keys, axis=0, return_inverse=True)
    request = request.reshape(-1)
    truth = sp.csr_matrix(
        (np.ones(len(items), dtype=np.float32), (request, items)), shape=(len(unique), test.shape[1]), dtype=np.float32
    )
    truth.sum_duplicates()
    return Requests(unique[:, 0].copy(), {n: unique[:, k + 1].copy() for k, n in enumerate(names)}, truth)
