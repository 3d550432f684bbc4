"""The inputs every backbone reads, in one schema: per-entity features (categorical codes, hashed columns,
bags of codes, standardised dense values), per-row context codes and their tables, and pooled history bags.

The MLP backbone embeds them in owner-masked tables (csmf.backbones.mlp), the graph backbone in D-wide column
tables (csmf.backbones.graph), the multi-task towers in plain ones; what a column is and how its values become
codes is decided here once, so every model of a dataset reads the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from csmf.feature_schema import column_kind
from csmf.hashing import mix64


def pool_bags(
    table: torch.Tensor,
    matrices: list[sp.csr_matrix],
    users: np.ndarray,
    leave_out: np.ndarray | None = None,
    power: float = 1.0,
    sparse_grad: bool = False,
) -> list[torch.Tensor]:
    """One pooled bag per behaviour matrix: sum of the table rows of the user's items / count**power.

    table: (N, H) history embeddings; matrices: binary users x items; `leave_out[n]` (an item id) is dropped
    from row n of every bag that holds it, so a training example never sees its own target.
    sparse_grad: while gradients are on, the table's gradient holds only the rows the bags read (embedding_bag),
    for a table that steps row-sparse (train.sparse_table_rows); the sparse product's backward fills a dense (N, H)
    gradient, which held a 200,000-item catalogue's history MLP at a quarter of the user-ID MLP's steps/s. Same
    sums, added in another order, so smaller tables keep the product and the numbers they always had, and scoring
    (no gradients) always takes the product: the trained model and the same model loaded score alike.
    Returns len(matrices) tensors of shape (B, H).
    """
    out = []
    n_items, device = table.shape[0], table.device
    sparse_grad = sparse_grad and torch.is_grad_enabled()
    for mat in matrices:
        rows = mat[users]
        counts = torch.from_numpy(np.diff(rows.indptr).astype(np.float32)).to(device)
        with torch.autocast(device_type=device.type, enabled=False):  # no bfloat16 sparse product on CUDA
            if sparse_grad:
                items = torch.from_numpy(rows.indices.astype(np.int64)).to(device)
                starts = torch.from_numpy(rows.indptr[:-1].astype(np.int64)).to(device)
                total = torch.nn.functional.embedding_bag(items, table, starts, mode="sum", sparse=True)
            else:
                coo = rows.tocoo()
                idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
                sparse = torch.sparse_coo_tensor(idx, torch.ones(coo.nnz), (len(users), n_items),
                                                 check_invariants=False).to(device)  # fmt: skip
                # built from a valid scipy matrix: the invariant check would only cost time
                total = torch.sparse.mm(sparse, table.float())  # (B, H)
        if leave_out is not None:
            hit = torch.from_numpy(np.asarray(rows[np.arange(len(users)), leave_out]).ravel() > 0).to(device)
            ids = torch.from_numpy(leave_out).to(device)
            left = torch.nn.functional.embedding(ids, table, sparse=True) if sparse_grad else table[ids]
            total = total - left * hit.float().unsqueeze(1)
            counts = counts - hit.float()
        out.append(total / counts.clamp(min=1.0).pow(power).unsqueeze(1))
    return out


@dataclass
class Features:
    """Per-entity feature inputs: categorical codes, bags of codes (both embedded) and standardised dense values.

    A bag (a list feature: behaviour fields, a history column) is an (n, L) array of codes with 0 as padding;
    its embedding is the mean of its codes' rows. A categorical column with more than `max_categories`
    values is hashed into `hash_buckets` buckets (a stable hash of its value), never turned into a number.
    """

    categorical: dict[str, torch.Tensor]  # name -> (n,) long codes
    cardinality: dict[str, int]  # name -> rows of its table: categorical columns, then bags
    dense: torch.Tensor | None  # (n, n_dense) float32
    bags: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (n, L) long codes, 0 = padding
    hashed: tuple[str, ...] = ()  # categorical columns hashed into buckets (too many values)

    @staticmethod
    def from_arrays(
        arrays: dict[str, np.ndarray],
        max_categories: int,
        hash_buckets: int = 4096,
        dense_names: tuple[str, ...] = (),
        categorical_names: tuple[str, ...] = (),
    ) -> Features:
        categorical, cardinality, dense, bags, hashed = {}, {}, [], {}, []
        for name, values in sorted(arrays.items()):
            values = np.asarray(values)
            kind = column_kind(name, values, max_categories, dense_names, categorical_names)
            if kind == "bag":  # codes 1.., 0 = padding
                bags[name] = torch.from_numpy(values.astype(np.int64))
            elif kind == "dense":
                v = values.astype(np.float64)
                dense.append((v - v.mean()) / (v.std() + 1e-8))
            elif kind == "categorical":
                uniques, codes = np.unique(values, return_inverse=True)
                categorical[name] = torch.from_numpy(codes.astype(np.int64))
                cardinality[name] = len(uniques)
            else:  # hashed by value, so a value keeps its bucket when the data around it changes
                categorical[name] = torch.from_numpy(stable_hash(values) % hash_buckets)
                cardinality[name] = hash_buckets
                hashed.append(name)
        for name, codes in bags.items():
            cardinality[name] = int(codes.max()) + 1 if codes.numel() else 1
        dense_t = torch.from_numpy(np.stack(dense, axis=1).astype(np.float32)) if dense else None
        return Features(categorical, cardinality, dense_t, bags, tuple(hashed))

    @property
    def n_dense(self) -> int:
        return 0 if self.dense is None else self.dense.shape[1]

    def to(self, device: torch.device) -> Features:
        """The same features with their tensors on `device` (a tower's lookups index them there)."""
        return Features(
            {n: t.to(device) for n, t in self.categorical.items()}, dict(self.cardinality),
            None if self.dense is None else self.dense.to(device), {n: t.to(device) for n, t in self.bags.items()},
            self.hashed,
        )  # fmt: skip

    def lookup(self, name: str, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B, d) rows of `weight` for entities `ids`: a categorical's row, or the mean over a bag's codes."""
        if name in self.bags:
            codes = self.bags[name][ids]  # (B, L)
            present = (codes > 0).unsqueeze(-1).to(weight.dtype)
            return (_rows(weight, codes) * present).sum(dim=1) / present.sum(dim=1).clamp(min=1.0)
        return _rows(weight, self.categorical[name][ids])

    def lookup_all(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """(n, d): `lookup` for every entity."""
        if name in self.bags:
            return self.lookup(name, torch.arange(len(self.bags[name]), device=weight.device), weight)
        return _rows(weight, self.categorical[name])


def _rows(weight: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """weight[codes] whose gradient is an index_add: indexing's own backward is an index_put that sorts its indices
    under deterministic algorithms (0.3 s a step on the 55k items of a pooled step on the 2.2M-row simulator)."""
    return weight.index_select(0, codes.reshape(-1)).view(*codes.shape, weight.shape[1])


def stable_hash(values: np.ndarray) -> np.ndarray:
    """A platform-independent 63-bit hash of integer values."""
    return (mix64(values.astype(np.int64).view(np.uint64)) >> np.uint64(1)).astype(np.int64)


def context_rows(codes: torch.Tensor, buckets: int) -> torch.Tensor:
    """Table rows of context codes: the code itself, or (many values) its stable hash into 1..buckets;
    0 (unknown) stays 0."""
    if not buckets:
        return codes
    hashed = torch.from_numpy(stable_hash(codes.numpy()) % buckets + 1)
    return torch.where(codes > 0, hashed, 0)


def context_tables(sizes: dict[str, int], m) -> tuple[dict[str, int], dict[str, int]]:
    """(rows per context table, buckets of the hashed columns) as `model` (a ModelConfig) asks: a column with
    more than max_categories values is hashed into hash_buckets buckets, as a categorical feature is."""
    rows, hashed = {}, {}
    for name, size in sorted(sizes.items()):
        if size - 1 > m.max_categories:
            rows[name], hashed[name] = m.hash_buckets + 1, m.hash_buckets
        else:
            rows[name] = size
    return rows, hashed


def features_of(arrays: dict[str, np.ndarray], m) -> Features:
    """Features built as `model` (a ModelConfig) asks: its category threshold, hash buckets and overrides;
    none at all when model.features is off (an ID-only model of the same data)."""
    if not m.features:
        arrays = {}
    return Features.from_arrays(arrays, m.max_categories, m.hash_buckets, m.dense_features, m.categorical_features)
