"""The two-tower backbone built from owner-masked layers (design (B), method notes §2).

User tower: user-ID embedding + one mean-pooled bag per training behaviour (the items the user viewed,
bought, ...; YouTube-DNN style, one shared history table) + user features -> MLP -> D.
Item tower: item-ID embedding + item features -> MLP -> D.
Every embedding column, hidden unit and output dimension has an owner stage (masks.py). There are no
normalisation layers: a norm mixes units of different stages and would break cascade isolation; biases
are per unit, so they belong to their unit's stage. The objective-k score is the inner product over
the output dimensions owned by stages 1..k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from csmf.hashing import mix64
from csmf.masks import active, trainable_rows, usable


def pool_bags(
    table: torch.Tensor,
    matrices: list[sp.csr_matrix],
    users: np.ndarray,
    leave_out: np.ndarray | None = None,
    power: float = 1.0,
) -> list[torch.Tensor]:
    """One pooled bag per behaviour matrix: sum of the table rows of the user's items / count**power.

    table: (N, H) history embeddings; matrices: binary users x items; `leave_out[n]` (an item id) is dropped
    from row n of every bag that holds it, so a training example never sees its own target.
    Returns len(matrices) tensors of shape (B, H).
    """
    out = []
    n_items, device = table.shape[0], table.device
    for mat in matrices:
        rows = mat[users]
        counts = torch.from_numpy(np.diff(rows.indptr).astype(np.float32)).to(device)
        coo = rows.tocoo()
        idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
        sparse = torch.sparse_coo_tensor(idx, torch.ones(coo.nnz), (len(users), n_items), check_invariants=False).to(
            device
        )  # built from a valid scipy matrix: the invariant check would only cost time
        with torch.autocast(device_type=device.type, enabled=False):  # no bfloat16 sparse product on CUDA
            total = torch.sparse.mm(sparse, table.float())  # (B, H)
        if leave_out is not None:
            hit = torch.from_numpy(np.asarray(rows[np.arange(len(users)), leave_out]).ravel() > 0).to(device)
            total = total - table[torch.from_numpy(leave_out).to(device)] * hit.float().unsqueeze(1)
            counts = counts - hit.float()
        out.append(total / counts.clamp(min=1.0).pow(power).unsqueeze(1))
    return out


class MaskedEmbedding(nn.Module):
    """Embedding table whose columns are units with owners."""

    def __init__(self, num: int, dim: int, generator: torch.Generator, scale: float = 0.05):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num, dim, generator=generator) * scale)
        self.register_buffer("owner", torch.ones(dim, dtype=torch.long))
        # sparse gradients (only the rows a batch touches): for tables too large to update whole every step
        # (streamed training, csmf.cascade); the forward values are the same either way
        self.sparse = False

    def column_mask(self, stage: int) -> torch.Tensor:
        return active(self.owner, stage).float()

    def forward(self, idx: torch.Tensor, stage: int) -> torch.Tensor:
        rows = nn.functional.embedding(idx, self.weight, sparse=True) if self.sparse else self.weight[idx]
        return rows * self.column_mask(stage)  # (B, dim)

    def magnitude(self) -> torch.Tensor:
        return self.weight.detach().abs().sum(dim=0)  # (dim,) L1 mass of each column

    def mask_grad(self, stage: int) -> None:
        grad = self.weight.grad
        if grad is None:
            return
        keep = trainable_rows(self.owner, stage).float()
        if grad.is_sparse:  # the touched rows' values, column by column
            grad = grad.coalesce()
            self.weight.grad = torch.sparse_coo_tensor(
                grad.indices(), grad.values() * keep, grad.shape, check_invariants=False
            )  # the indices of a coalesced gradient: valid by construction
        else:
            grad *= keep


class MaskedLinear(nn.Module):
    """Linear layer whose output units have owners; W[j, i] obeys the cascade-isolation rule."""

    def __init__(self, n_in: int, n_out: int, generator: torch.Generator):
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)
        self.weight = nn.Parameter((torch.rand(n_out, n_in, generator=generator) * 2 - 1) * bound)
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.register_buffer("owner", torch.ones(n_out, dtype=torch.long))

    def forward(self, x: torch.Tensor, owner_in: torch.Tensor, stage: int) -> torch.Tensor:
        mask = usable(self.owner, owner_in, stage).float()  # (out, in)
        return x @ (self.weight * mask).T + self.bias * active(self.owner, stage).float()  # (B, out)

    def magnitude(self, owner_in: torch.Tensor) -> torch.Tensor:
        """(out,) L1 norm of each unit's usable incoming weights (at its own stage)."""
        top = int(self.owner.max())
        mask = usable(self.owner, owner_in, max(top, 1)).float()
        return (self.weight.detach().abs() * mask).sum(dim=1)

    def mask_grad(self, owner_in: torch.Tensor, stage: int) -> None:
        rows = trainable_rows(self.owner, stage).unsqueeze(1)
        keep = (rows & usable(self.owner, owner_in, stage)).float()
        if self.weight.grad is not None:
            self.weight.grad *= keep
        if self.bias.grad is not None:
            self.bias.grad *= trainable_rows(self.owner, stage).float()


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
            if values.ndim == 2:  # a bag: codes 1.., 0 = padding
                bags[name] = torch.from_numpy(values.astype(np.int64))
                continue
            is_int = np.issubdtype(values.dtype, np.integer) or bool(np.all(np.mod(values, 1) == 0))
            if name in dense_names or not (is_int or name in categorical_names):
                v = values.astype(np.float64)
                dense.append((v - v.mean()) / (v.std() + 1e-8))
                continue
            uniques, codes = np.unique(values, return_inverse=True)
            if len(uniques) <= max_categories:
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
            return (weight[codes] * present).sum(dim=1) / present.sum(dim=1).clamp(min=1.0)
        return weight[self.categorical[name][ids]]

    def lookup_all(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """(n, d): `lookup` for every entity."""
        if name in self.bags:
            return self.lookup(name, torch.arange(len(self.bags[name]), device=weight.device), weight)
        return weight[self.categorical[name]]


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


class Tower(nn.Module):
    """ID embedding (+ history bags) (+ features) -> masked MLP -> D."""

    def __init__(
        self,
        n_ids: int,
        id_dim: int,
        hidden: tuple[int, ...],
        out_dim: int,
        features: Features,
        feature_dim: int,
        generator: torch.Generator,
        history_items: int = 0,
        history_dim: int = 0,
        n_bags: int = 0,
        dropout: float = 0.0,
        context: dict[str, int] | None = None,
        context_hashed: dict[str, int] | None = None,
    ):
        super().__init__()
        self.dropout = dropout
        self.id_emb = MaskedEmbedding(n_ids, id_dim, generator)
        self.history = MaskedEmbedding(history_items, history_dim, generator) if n_bags else None
        self.n_bags = n_bags
        self.features = features
        self.feat_emb = nn.ModuleDict(
            {name: MaskedEmbedding(card, feature_dim, generator) for name, card in features.cardinality.items()}
        )
        # per-row context (csmf.data.context): one table per column, row 0 = unknown; columns are units as for
        # every other embedding, so CPP frees them and stage masks hold
        self.ctx_emb = nn.ModuleDict(
            {name: MaskedEmbedding(rows, feature_dim, generator) for name, rows in (context or {}).items()}
        )
        self.ctx_hashed = dict(context_hashed or {})  # column -> buckets its codes are hashed into (many values)
        n_in = id_dim + n_bags * history_dim + (len(self.feat_emb) + len(self.ctx_emb)) * feature_dim
        n_in += features.n_dense
        widths = [n_in, *hidden, out_dim]
        self.layers = nn.ModuleList(MaskedLinear(a, b, generator) for a, b in zip(widths, widths[1:], strict=False))

    def input_owner(self) -> torch.Tensor:
        """Owners of the first layer's inputs: embedding columns, then dense features (owner 1: always on)."""
        parts = [self.id_emb.owner]
        if self.history is not None:
            parts += [self.history.owner] * self.n_bags
        parts += [emb.owner for emb in self.feat_emb.values()]
        parts += [emb.owner for emb in self.ctx_emb.values()]
        parts.append(torch.ones(self.features.n_dense, dtype=torch.long, device=self.id_emb.owner.device))
        return torch.cat(parts)

    def forward(
        self,
        ids: torch.Tensor,
        stage: int,
        bags: list[torch.Tensor] | None = None,
        context: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """context: column -> (B,) codes of each row's context (absent column or code 0 = unknown)."""
        x = [self.id_emb(ids, stage)]
        if self.history is not None:
            mask = self.history.column_mask(stage)
            x += [bag * mask for bag in bags]  # bags are pooled from self.history.weight by the caller
        x += [
            self.features.lookup(name, ids, emb.weight) * emb.column_mask(stage) for name, emb in self.feat_emb.items()
        ]
        for name, emb in self.ctx_emb.items():
            codes = (context or {}).get(name)
            rows = (
                torch.zeros_like(ids)
                if codes is None
                else context_rows(codes.cpu(), self.ctx_hashed.get(name, 0)).to(ids.device)
            )
            rows = torch.where((rows >= 0) & (rows < emb.weight.shape[0]), rows, 0)  # unseen value: unknown
            x.append(emb(rows, stage))
        if self.features.dense is not None:
            x.append(self.features.dense[ids])
        h = torch.cat(x, dim=1)
        if self.dropout > 0:  # element-wise on the inputs: regularises without mixing stages
            h = torch.nn.functional.dropout(h, self.dropout, self.training)
        owner_in = self.input_owner()
        for n, layer in enumerate(self.layers):
            h = layer(h, owner_in, stage)
            if n < len(self.layers) - 1:
                h = torch.relu(h)
            owner_in = layer.owner
        return h

    def embeddings(self) -> list[MaskedEmbedding]:
        out = [self.id_emb] + ([self.history] if self.history is not None else [])
        return out + list(self.feat_emb.values()) + list(self.ctx_emb.values())

    def layer_inputs(self) -> list[tuple[MaskedLinear, torch.Tensor]]:
        """Each linear layer with the owners of its inputs."""
        pairs, owner_in = [], self.input_owner()
        for layer in self.layers:
            pairs.append((layer, owner_in))
            owner_in = layer.owner
        return pairs

    def mask_grads(self, stage: int) -> None:
        for emb in self.embeddings():
            emb.mask_grad(stage)
        for layer, owner_in in self.layer_inputs():
            layer.mask_grad(owner_in, stage)


class TwoTower(nn.Module):
    """The backbone. `output_owner` (the last layer's owners, shared by both towers) defines the groups."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        user_hidden: tuple[int, ...],
        item_hidden: tuple[int, ...],
        id_dim: int,
        user_id_dim: int,
        history_dim: int,
        behaviours: tuple[str, ...],
        user_features: Features,
        item_features: Features,
        feature_dim: int,
        seed: int,
        dropout: float = 0.0,
        bag_power: float = 1.0,
        context: dict[str, int] | None = None,
        context_hashed: dict[str, int] | None = None,
    ):
        """context: per-row context column -> rows of its table (codes + unknown), read by the user tower;
        context_hashed: column -> buckets, for a column whose codes are hashed (more than max_categories)."""
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.behaviours = behaviours
        self.user = Tower(
            n_users, user_id_dim, user_hidden, dim, user_features, feature_dim, g,
            history_items=n_items, history_dim=history_dim, n_bags=len(behaviours), dropout=dropout, context=context,
            context_hashed=context_hashed,
        )  # fmt: skip
        self.item = Tower(n_items, id_dim, item_hidden, dim, item_features, feature_dim, g, dropout=dropout)
        self.n_items = n_items
        self.bag_power = bag_power
        self.bag_matrices: dict[str, sp.csr_matrix] = {}

    # ----- history bags ------------------------------------------------------------------------
    def set_history(self, matrices: dict[str, sp.csr_matrix]) -> None:
        """Binary user x item matrices the bags are pooled from (train data only)."""
        self.bag_matrices = {b: matrices[b] for b in self.behaviours}

    def bags(
        self, users: np.ndarray, leave_out: np.ndarray | None = None, history: dict[str, sp.csr_matrix] | None = None
    ) -> list[torch.Tensor]:
        """Mean of the history embeddings of each behaviour's items; `leave_out[n]` is dropped from row n.

        `history` overrides the training matrices set by `set_history` (evaluation uses other data).
        """
        source = history if history is not None else self.bag_matrices
        matrices = [source[b] for b in self.behaviours]
        return pool_bags(self.user.history.weight, matrices, users, leave_out, self.bag_power)

    # ----- vectors and scores ------------------------------------------------------------------
    @property
    def output_owner(self) -> torch.Tensor:
        return self.user.layers[-1].owner

    def user_vectors(
        self,
        users: np.ndarray,
        stage: int,
        leave_out: np.ndarray | None = None,
        history: dict[str, sp.csr_matrix] | None = None,
        context: dict[str, np.ndarray] | None = None,
    ) -> torch.Tensor:
        """(B, D); context: column -> (B,) codes (csmf.data.context), None = unknown context."""
        device = self.device
        ids = torch.from_numpy(np.asarray(users, dtype=np.int64)).to(device)
        bags = self.bags(np.asarray(users), leave_out, history) if self.user.history is not None else None
        codes = {n: torch.from_numpy(np.asarray(c, dtype=np.int64)).to(device) for n, c in (context or {}).items()}
        return self.user(ids, stage, bags, codes)  # (B, D)

    def item_vectors(self, stage: int, items: torch.Tensor | None = None) -> torch.Tensor:
        ids = torch.arange(self.n_items, device=self.device) if items is None else items.to(self.device)
        return self.item(ids, stage)  # (N, D)

    @property
    def device(self) -> torch.device:
        return self.user.layers[0].weight.device

    def place(self, device: torch.device) -> TwoTower:
        """Move the weights and the feature tensors to `device` (training on a GPU: csmf.cascade)."""
        self.to(device)
        self.user.features, self.item.features = self.user.features.to(device), self.item.features.to(device)
        return self

    def group_mask(self, stage: int) -> torch.Tensor:
        """(D,) 1 on the output dimensions that objective `stage` scores with (owners 1..stage)."""
        return active(self.output_owner, stage).float()

    def mask_grads(self, stage: int) -> None:
        self.user.mask_grads(stage)
        self.item.mask_grads(stage)

    def sync_output_owner(self) -> None:
        """Both towers' last layers share one owner vector: a dimension is one stage's in u and in v."""
        self.item.layers[-1].owner.copy_(self.user.layers[-1].owner)

    def prunable(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, magnitude, owner buffer) for every unit group CPP may prune, in a stable order.

        The output dimensions are one group for both towers (a dimension is one stage's in u and in v):
        their magnitude is the sum of the user and item output rows; `sync_output_owner` copies the
        result to the item tower.
        """
        out = []
        for tname, tower in (("user", self.user), ("item", self.item)):
            for n, emb in enumerate(tower.embeddings()):
                if len(emb.owner):  # a zero-width table (no user-ID embedding) has no units
                    out.append((f"{tname}.emb{n}", emb.magnitude(), emb.owner))
            for n, (layer, owner_in) in enumerate(tower.layer_inputs()[:-1]):
                out.append((f"{tname}.hidden{n}", layer.magnitude(owner_in), layer.owner))
        (u_last, u_in), (i_last, i_in) = self.user.layer_inputs()[-1], self.item.layer_inputs()[-1]
        out.append(("output", u_last.magnitude(u_in) + i_last.magnitude(i_in), u_last.owner))
        return out

    def ownership(self) -> dict[str, dict[int, float]]:
        return ownership(self.prunable())


def ownership(groups: list[tuple[str, torch.Tensor, torch.Tensor]]) -> dict[str, dict[int, float]]:
    """Per unit group (name, magnitude, owner): the fraction of units each owner (0 = free) holds."""
    table = {}
    for name, _, owner in groups:
        values, counts = torch.unique(owner, return_counts=True)
        table[name] = {int(v): round(float(c) / len(owner), 4) for v, c in zip(values, counts, strict=False)}
    return table
