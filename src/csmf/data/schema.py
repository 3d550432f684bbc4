"""The in-memory cascade: users, items, ordered stages of positive (user, item) pairs, features.

`CascadeLog` is what a loader reads (every positive of every stage, before any split);
`CascadeData` is what models and evaluation see (train / valid / test per stage, after a split).
Pairs are scipy CSR matrices (users x items) with int32 indices and float32 ones as data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


def pairs_to_csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary user x item matrix from pair arrays; repeated pairs collapse to one."""
    mat = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users.astype(np.int32), items.astype(np.int32))),
        shape=(n_users, n_items),
        dtype=np.float32,
    )
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return _int32(mat)


def _int32(mat: sp.csr_matrix) -> sp.csr_matrix:
    mat.indices = mat.indices.astype(np.int32, copy=False)
    mat.indptr = mat.indptr.astype(np.int32, copy=False) if mat.nnz < 2**31 else mat.indptr
    return mat


class RowUnion:
    """The union of CSR matrices of one shape, read a block of rows at a time (`union[rows]`): rankings exclude
    a batch's seen items from it without the whole union being built. At the 42M-row release that union held
    0.23 GiB and its build 0.46 GiB more at every validation, on top of training's memory: the run's peak."""

    def __init__(self, mats: tuple[sp.csr_matrix, ...]) -> None:
        self.mats = mats
        self.shape = mats[0].shape

    def __getitem__(self, rows: np.ndarray) -> sp.csr_matrix:
        return union(*(m[rows] for m in self.mats))


def binary(mat: sp.spmatrix) -> sp.csr_matrix:
    """Copy of `mat` as a 0/1 float32 CSR (explicit zeros removed)."""
    out = sp.csr_matrix(mat, dtype=np.float32, copy=True)
    out.eliminate_zeros()
    out.data[:] = 1.0
    return _int32(out)


def difference(a: sp.csr_matrix, b: sp.csr_matrix) -> sp.csr_matrix:
    """Pairs of `a` that are not in `b`."""
    return binary(a - a.multiply(binary(b)))


def intersection(a: sp.csr_matrix, b: sp.csr_matrix) -> sp.csr_matrix:
    return binary(a.multiply(b))


def union(*mats: sp.csr_matrix) -> sp.csr_matrix:
    total = mats[0].copy()
    for m in mats[1:]:
        total = total + m
    return binary(total)


@dataclass
class LoadReport:
    """What a load and split did: counts, skipped rows by reason, cascade statistics, notes."""

    source: str
    rows_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped (never silent)
    duplicate_pairs: int = 0  # rows whose (user, item) repeats an earlier row; labels are OR-ed
    stage_positives: dict[str, int] = field(default_factory=dict)
    subset_rate: dict[str, float] = field(default_factory=dict)  # stage -> share inside the stage before
    cold_test_users: dict[str, int] = field(default_factory=dict)  # test users with no train history
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str, count: int = 1) -> None:
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + int(count)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "skipped": dict(self.skipped),
            "duplicate_pairs": self.duplicate_pairs,
            "stage_positives": dict(self.stage_positives),
            "subset_rate": {k: round(v, 4) for k, v in self.subset_rate.items()},
            "cold_test_users": dict(self.cold_test_users),
            "notes": list(self.notes),
        }

    def render(self) -> str:
        lines = [f"load report: {self.source}", f"  rows read: {self.rows_read:,}"]
        if self.duplicate_pairs:
            lines.append(f"  duplicate (user, item) rows merged: {self.duplicate_pairs:,}")
        for reason, count in self.skipped.items():
            lines.append(f"  skipped {count:,} rows: {reason}")
        for stage, count in self.stage_positives.items():
            lines.append(f"  stage {stage}: {count:,} positive pairs")
        for stage, rate in self.subset_rate.items():
            lines.append(f"  {stage}: {rate:.1%} of its pairs are in the stage before it")
        for stage, count in self.cold_test_users.items():
            lines.append(f"  {stage}: {count:,} test users have no training history (kept)")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class CascadeLog:
    """Every positive pair of every stage, before splitting.

    `labels[p, s]` says whether pair p is a positive of stage s; pairs are unique (user, item).
    """

    stages: tuple[str, ...]
    n_users: int
    n_items: int
    users: np.ndarray  # (P,) int32
    items: np.ndarray  # (P,) int32
    labels: np.ndarray  # (P, S) bool
    timestamps: np.ndarray | None = None  # (P,) float64, latest timestamp of the pair
    user_ids: np.ndarray | None = None  # original id of each user index (for serving)
    item_ids: np.ndarray | None = None
    user_features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_users,)
    item_features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_items,)
    report: LoadReport = field(default_factory=lambda: LoadReport("memory"))
    context: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (P,) codes 1.. of the pair's latest row

    def stage_matrix(self, stage: str) -> sp.csr_matrix:
        col = self.labels[:, self.stages.index(stage)]
        return pairs_to_csr(self.users[col], self.items[col], self.n_users, self.n_items)


@dataclass
class CascadeData:
    """A split cascade: what every model fits on and every evaluation reads.

    - `train[s]`: the pairs a model may train on for stage s (the final fit).
    - `valid[s]`: pairs used only to select hyper-parameters and epochs.
    - `test[s]`: pairs used only for the reported numbers.
    - `valid_holdout`: validation pairs that sit inside `train` (a tuning fold); `tuning_view()` removes
      them from every train matrix. JD purchases have an external validation file instead.
    - `side[name]`: auxiliary training behaviours outside the cascade (JD favorites when they are not
      a stage); models may train on them, nothing evaluates them.
    - `exclude[s]`: names of `train`/`side` matrices whose items are removed from stage s rankings.
    """

    name: str
    stages: tuple[str, ...]
    n_users: int
    n_items: int
    train: dict[str, sp.csr_matrix]
    valid: dict[str, sp.csr_matrix]
    test: dict[str, sp.csr_matrix]
    exclude: dict[str, tuple[str, ...]]
    side: dict[str, sp.csr_matrix] = field(default_factory=dict)
    # stage -> training matrices at or after it in the full cascade (side behaviours included), i.e.
    # the ones a test pair of that stage must never be in. Default: the stage and the later stages.
    downstream: dict[str, tuple[str, ...]] = field(default_factory=dict)
    valid_holdout: sp.csr_matrix | None = None
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    user_features: dict[str, np.ndarray] = field(default_factory=dict)
    item_features: dict[str, np.ndarray] = field(default_factory=dict)
    report: LoadReport = field(default_factory=lambda: LoadReport("memory"))
    # the Parquet cache (csmf.data.cache.Cache) whose rows train.stream reads; `train` then holds only the rows
    # of the evaluated users (what ranking them excludes), not every training pair
    stream: object | None = None
    # when set, evaluation ranks only these items (a bool per item; the cold-item split), else the catalogue
    candidates: np.ndarray | None = None
    # per-row context (csmf.data.context): name -> users x items integer codes of each logged pair, every split
    context: dict[str, sp.csr_matrix] = field(default_factory=dict)
    # (U, N) the time rank of each training pair (1 = oldest; csmf.data.histories), when the log has timestamps:
    # what `model.history_max` keeps the latest items of
    recency: sp.csr_matrix | None = None

    def matrix(self, name: str) -> sp.csr_matrix:
        """A training matrix by name: a stage or a side behaviour."""
        if name in self.train:
            return self.train[name]
        if name in self.side:
            return self.side[name]
        raise KeyError(f"no training matrix named {name!r}; have {list(self.train) + list(self.side)}")

    def context_sizes(self) -> dict[str, int]:
        """Rows of each per-row context column's table (codes + code 0, unknown): the cache's vocabulary when
        training streams (`context` then holds only the evaluated users' pairs), else the codes in `context`."""
        if self.stream is not None and self.context:
            return self.stream.context_sizes()
        return {name: int(mat.data.max(initial=0)) + 1 for name, mat in self.context.items()}

    @property
    def behaviours(self) -> tuple[str, ...]:
        """Every training matrix name: the stages in cascade order, then side behaviours."""
        return tuple(self.train) + tuple(self.side)

    def downstream_of(self, stage: str) -> tuple[str, ...]:
        if stage in self.downstream:
            return self.downstream[stage]
        return self.stages[self.stages.index(stage) :]

    def excluded(self, stage: str) -> sp.csr_matrix:
        """Items removed from stage rankings: union of the named training matrices."""
        return union(*(self.matrix(name) for name in self.exclude[stage]))

    def excluded_rows(self, stage: str) -> RowUnion:
        """`excluded(stage)` read by rows: the same pairs for any block of users, without building the union."""
        return RowUnion(tuple(self.matrix(name) for name in self.exclude[stage]))

    def tuning_view(self) -> CascadeData:
        """The same cascade with validation as its test side: what hyper-parameter search sees.

        Train matrices lose the tuning-fold pairs, so no validation pair is trained on.
        """
        hold = self.valid_holdout

        def strip(m: sp.csr_matrix) -> sp.csr_matrix:
            return m if hold is None else difference(m, hold)

        return CascadeData(
            name=f"{self.name}:valid",
            stages=self.stages,
            n_users=self.n_users,
            n_items=self.n_items,
            train={s: strip(m) for s, m in self.train.items()},
            valid={},
            test=dict(self.valid),
            exclude=dict(self.exclude),
            side={s: strip(m) for s, m in self.side.items()},
            downstream=dict(self.downstream),
            valid_holdout=None,
            user_ids=self.user_ids,
            item_ids=self.item_ids,
            user_features=self.user_features,
            item_features=self.item_features,
            report=self.report,
            stream=self.stream,
            context=self.context,
            recency=self.recency,
        )

    def fingerprint(self) -> str:
        """A hash of every pair of every split and of the features: two loads agree on it exactly when
        a model trained on one is a model of the other (run folders compare it before resuming)."""
        h = hashlib.sha256(json.dumps([self.stages, self.n_users, self.n_items]).encode())  # content, not name
        parts = (("train", self.train), ("valid", self.valid), ("test", self.test), ("side", self.side))
        times = {"pairs": self.recency} if self.recency is not None else {}
        # no context or times: the hash it had before they existed
        for part, mats in (*parts, ("context", self.context), ("recency", times)):
            for name in sorted(mats):
                m = mats[name].tocsr()
                m.sort_indices()
                h.update(f"{part}/{name}/{m.shape}".encode())
                h.update(np.ascontiguousarray(m.indptr, dtype=np.int64).tobytes())
                h.update(np.ascontiguousarray(m.indices, dtype=np.int64).tobytes())
                h.update(np.ascontiguousarray(m.data, dtype=np.float64).tobytes())
        for kind, features in (("user", self.user_features), ("item", self.item_features)):
            for name in sorted(features):
                h.update(f"{kind}/{name}".encode())
                h.update(np.ascontiguousarray(features[name]).tobytes())
        return h.hexdigest()[:24]

    def summary(self) -> str:
        lines = [f"{self.name}: {self.n_users:,} users x {self.n_items:,} items, cascade {' -> '.join(self.stages)}"]
        for s in self.stages:
            v = self.valid.get(s)
            lines.append(
                f"  {s}: train {self.train[s].nnz:,}  valid {0 if v is None else v.nnz:,}  "
                f"test {self.test[s].nnz:,} pairs ({count_users(self.test[s]):,} test users)"
            )
        for name, m in self.side.items():
            lines.append(f"  side behaviour {name}: {m.nnz:,} train pairs")
        return "\n".join(lines)


def count_users(mat: sp.csr_matrix) -> int:
    return int((np.diff(mat.indptr) > 0).sum())


def subset_rates(stages: tuple[str, ...], mats: dict[str, sp.csr_matrix]) -> dict[str, float]:
    """For each stage after the first: the share of its pairs that are also in the stage before."""
    rates = {}
    for prev, cur in zip(stages, stages[1:], strict=False):
        if mats[cur].nnz:
            rates[cur] = intersection(mats[cur], mats[prev]).nnz / mats[cur].nnz
    return rates


def leak_violations(data: CascadeData) -> list[str]:
    """The leak rule: no test (or valid) pair of a stage is in train of that stage or a later one.

    Returns human-readable violations; empty when the split is clean. Validation pairs that live in
    a tuning fold are checked against the tuning view's train, where they are removed.
    """
    problems = []
    tuning = data.tuning_view()
    for side_name, source in (("test", data), ("valid", tuning)):
        held = data.test if side_name == "test" else data.valid
        for stage in data.stages:
            if stage not in held or held[stage] is None:
                continue
            for later in data.downstream_of(stage):
                leaked = intersection(held[stage], source.matrix(later)).nnz
                if leaked:
                    problems.append(f"{leaked} {stage} {side_name} pairs are in {later} train")
    for stage in data.stages:
        if stage in data.valid and data.valid[stage] is not None:
            both = intersection(data.valid[stage], data.test[stage]).nnz
            if both:
                problems.append(f"{both} {stage} pairs are in both valid and test")
    return problems
