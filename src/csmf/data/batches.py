"""Training batches, written once for every neural model: which pairs a stage trains on, the item frequencies of
the logQ correction, uniformly drawn extra negatives (Yi et al., RecSys 2019, sampling-bias-corrected softmax),
and the producers that cut a phase's data into seeded, shuffled batches.

A producer has `steps` (batches an epoch, for the progress bar), `rows` (training rows an epoch covers, for the
record) and `epoch()`, a fresh iterator of one epoch's batches that draws its order itself. Every draw comes
from the generator the producer is given, in a fixed order (the epoch's permutation, then per batch its
context dropout; the loss draws its negatives after that), so a seed gives the same batches on every run and,
with several processes, on every rank: each rank trains on its share of one global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from csmf.data.schema import CascadeData, difference, union
from csmf.distributed import Ranks


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


# ----- what a stage trains on ----------------------------------------------------------------------------


def coo_tensors(mat: sp.spmatrix, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """(rows, cols, values) of a sparse matrix as tensors on `device`: a batch's positives, seen items or lists."""
    coo = mat.tocoo()
    rows = torch.from_numpy(coo.row.astype(np.int64)).to(device)
    cols = torch.from_numpy(coo.col.astype(np.int64)).to(device)
    return rows, cols, torch.from_numpy(coo.data).to(device)


def pairs_of(mat: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) of a matrix's stored entries, in row then column order. int32 where the ids fit: a
    42M-row log's first stage holds 30M pairs for a whole phase (240 MB less than int64, and no sort of a COO
    copy); the batch producers hand int64 ids to the model."""
    mat = mat.tocsr()
    if not mat.has_sorted_indices:
        mat = mat.sorted_indices()
    index = np.int32 if max(mat.shape) < 2**31 else np.int64
    users = np.repeat(np.arange(mat.shape[0], dtype=index), np.diff(mat.indptr))
    return users, mat.indices.astype(index, copy=True)


def stage_pairs(
    data: CascadeData, objective: str, aux_weight: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(users, items, weights) an objective trains on: its own pairs (weight 1), plus the pairs of every other
    training behaviour that are not already its positives, at `aux_weight` (None = all weight 1)."""
    own = data.train[objective]
    if aux_weight <= 0:
        return (*pairs_of(own), None)
    others = [data.matrix(b) for b in data.behaviours if b != objective]
    aux = difference(union(*others), own) if others else own[:0]
    users, items = pairs_of(own)
    aux_users, aux_items = pairs_of(aux)
    weights = np.concatenate([np.ones(len(users)), np.full(len(aux_users), aux_weight)]).astype(np.float32)
    return np.concatenate([users, aux_users]), np.concatenate([items, aux_items]), weights


def target_matrix(
    users: np.ndarray, items: np.ndarray, weights: np.ndarray | None, n_users: int, n_items: int
) -> sp.csr_matrix:
    """(U, N) weight of every training positive: the per-user full-catalogue loss reads its rows."""
    values = np.ones(len(users), dtype=np.float32) if weights is None else weights.astype(np.float32)
    mat = sp.csr_matrix((values, (users, items)), shape=(n_users, n_items), dtype=np.float32)
    mat.sum_duplicates()
    return mat


def drop_context(codes: dict[str, np.ndarray], share: float, generator: torch.Generator) -> dict[str, np.ndarray]:
    """A seeded `share` of the rows lose their whole context (code 0 = unknown), so the context-free vector (a
    request without context, an exported vector) is trained too (model.context_dropout). No codes, no draw."""
    if not codes:
        return codes
    n = len(next(iter(codes.values())))
    drop = (torch.rand(n, generator=generator) < share).numpy()
    return {name: np.where(drop, 0, c) for name, c in codes.items()}


# ----- producers -------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """Training pairs: users[b] interacted with items[b]; weight[b] its loss weight (None = 1); codes: context
    column -> (B,) codes of each pair's row (empty when the model reads no context)."""

    users: np.ndarray
    items: np.ndarray
    weight: torch.Tensor | None = None
    codes: dict[str, np.ndarray] = field(default_factory=dict)


def _slices(order: np.ndarray, batch_size: int, ranks: Ranks) -> Iterator[np.ndarray]:
    """This rank's share of each consecutive batch of `order`; a tail too short to give every rank a part is
    skipped on every rank alike."""
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        if ranks.active and len(rows) < 2 * ranks.world:
            continue
        yield ranks.share(rows)


class PairBatches:
    """Pairs in memory, one seeded permutation an epoch."""

    def __init__(self, users: np.ndarray, items: np.ndarray, weights: np.ndarray | None,
                 codes: dict[str, np.ndarray], batch_size: int, generator: torch.Generator, ranks: Ranks,
                 context_dropout: float = 0.0):  # fmt: skip
        self.users, self.items, self.weights, self.codes = users, items, weights, codes
        self.batch_size, self.generator, self.ranks, self.context_dropout = (
            batch_size,
            generator,
            ranks,
            context_dropout,
        )
        self.steps, self.rows = -(-len(users) // batch_size), len(users)

    def epoch(self) -> Iterator[PairBatch]:
        order = torch.randperm(len(self.users), generator=self.generator).numpy()  # the same on every rank
        for idx in _slices(order, self.batch_size, self.ranks):
            weight = None if self.weights is None else torch.from_numpy(self.weights[idx])
            codes = {n: c[idx].astype(np.int64) for n, c in self.codes.items()}
            codes = drop_context(codes, self.context_dropout, self.generator)
            yield PairBatch(self.users[idx].astype(np.int64), self.items[idx].astype(np.int64), weight, codes)


class UserBatches:
    """Users, each with all of its positives (the per-user full-catalogue loss reads them from its targets),
    one seeded permutation an epoch. rows: the training pairs behind them."""

    def __init__(self, users: np.ndarray, batch_size: int, generator: torch.Generator, ranks: Ranks,
                 rows: int | None = None):  # fmt: skip
        self.users, self.batch_size, self.generator, self.ranks = users, batch_size, generator, ranks
        self.steps, self.rows = -(-len(users) // batch_size), len(users) if rows is None else rows

    @classmethod
    def of(cls, targets: sp.csr_matrix, batch_size: int, generator: torch.Generator, ranks: Ranks,
           rows: int | None = None) -> UserBatches:  # fmt: skip
        """Batches of the users with at least one positive in `targets`."""
        return cls(np.flatnonzero(np.diff(targets.indptr)), batch_size, generator, ranks, rows)

    def epoch(self) -> Iterator[np.ndarray]:
        order = torch.randperm(len(self.users), generator=self.generator).numpy()
        for idx in _slices(order, self.batch_size, self.ranks):
            yield self.users[idx]


class StreamedBatches:
    """A stage's training rows streamed from the Parquet cache (csmf.data.cache): batches come shuffled from a
    buffer; `share` < 1 keeps a seeded share of the rows (accuracy recovery). Every rank reads each batch and
    trains on its part. seeds: (run seed, phase seed), from which each epoch's order and share are drawn.

    aux_weight > 0 (train.aux_weight): the training rows of the `aux` stages whose pair is not a training positive
    of the objective stream too, at that weight (PairBatch.weight; Cache.weighted_batches), as `stage_pairs` adds
    them in memory, with two differences of a row stream: a pair logged twice counts twice (as own rows do), and
    the logQ counts are rows. One extra read of the cache counts them (Cache.aux_item_counts), and each epoch
    reads a bucket's own positives before its rows (4 columns)."""

    def __init__(self, cache, objective: str, batch_size: int, buffer_rows: int, share: float,
                 seeds: tuple[int, int], generator: torch.Generator, ranks: Ranks, context: bool,
                 context_dropout: float = 0.0, aux: tuple[str, ...] = (), aux_weight: float = 0.0):  # fmt: skip
        self.cache, self.objective, self.batch_size, self.buffer_rows = cache, objective, batch_size, buffer_rows
        self.share, self.seeds, self.generator, self.ranks = share, seeds, generator, ranks
        self.context, self.context_dropout = context, context_dropout
        self.aux, self.aux_weight = (tuple(aux), aux_weight) if aux_weight > 0 else ((), 0.0)
        self.counts = cache.train_item_counts(objective)  # (N,) training rows per item: the logQ correction
        if self.aux:  # the aux rows are in-batch candidates too
            self.counts = self.counts + cache.aux_item_counts(objective, self.aux)
        n_rows = int(self.counts.sum())
        self.steps, self.rows = int(np.ceil(n_rows * share / batch_size)), int(n_rows * share)
        self.epochs_drawn = 0

    def epoch(self) -> Iterator[PairBatch]:
        self.epochs_drawn += 1
        rng = np.random.default_rng([*self.seeds, self.epochs_drawn])
        order_seed = int(rng.integers(2**31))
        rows = self.cache.weighted_batches(self.objective, self.batch_size, order_seed, self.buffer_rows, self.aux,
                                           self.aux_weight)  # fmt: skip
        for users, items, codes, weights in rows:
            if self.share < 1.0:
                keep = rng.random(len(users)) < self.share
                users, items, codes = users[keep], items[keep], {n: c[keep] for n, c in codes.items()}
                weights = None if weights is None else weights[keep]
            codes = drop_context(codes, self.context_dropout, self.generator) if self.context else {}
            if len(users) < 2 * self.ranks.world:
                continue
            mine = self.ranks.share(np.arange(len(users)))
            weight = None if weights is None else torch.from_numpy(weights[mine])
            yield PairBatch(users[mine], items[mine], weight, {n: c[mine] for n, c in codes.items()})


class JointPairBatches:
    """Pairs of every objective at once (the multi-task towers): each step takes the next batch of each
    objective's own seeded permutation, wrapping around the smaller ones; an epoch is one pass of the largest."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], batch_size: int, generator: torch.Generator):
        self.pairs, self.batch_size, self.generator = pairs, batch_size, generator
        self.steps = max(-(-len(u) // batch_size) for u, _ in pairs)
        self.rows = self.steps * batch_size * len(pairs)

    def epoch(self) -> Iterator[list[PairBatch]]:
        orders = [torch.randperm(len(u), generator=self.generator).numpy() for u, _ in self.pairs]
        for step in range(self.steps):
            rows = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
            picks = [np.take(order, rows, mode="wrap") for order in orders]
            pairs = zip(self.pairs, picks, strict=True)
            yield [PairBatch(u[p].astype(np.int64), i[p].astype(np.int64)) for (u, i), p in pairs]
