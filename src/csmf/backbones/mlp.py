"""The two-tower backbone built from owner-masked layers (design (B), method notes §2).

User tower: user-ID embedding + one mean-pooled bag per training behaviour (the items the user viewed,
bought, ...; YouTube-DNN style, one shared history table) + user features -> MLP -> D.
Item tower: item-ID embedding + item features -> MLP -> D.
Every embedding column, hidden unit and output dimension has an owner stage (csmf.masks). There are no
normalisation layers: a norm mixes units of different stages and would break cascade isolation; biases
are per unit, so they belong to their unit's stage. The objective-k score is the inner product over
the output dimensions owned by stages 1..k.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from csmf.backbones.base import Backbone, TowerExport, UnitGroup
from csmf.backbones.features import Features, context_rows, context_tables, features_of, pool_bags
from csmf.data.histories import RecentHistory
from csmf.masks import active, trainable_rows, usable


class MaskedEmbedding(nn.Module):
    """Embedding table whose columns are units with owners."""

    def __init__(self, num: int, dim: int, generator: torch.Generator, scale: float = 0.05):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num, dim, generator=generator) * scale)
        self.register_buffer("owner", torch.ones(dim, dtype=torch.long))
        # sparse gradients (only the rows a batch touches): for tables too large to update whole every step
        # (streamed training: Backbone.sparse_tables); the forward values are the same either way
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
                grad.indices(), grad.values() * keep, grad.shape, check_invariants=False, is_coalesced=True
            )  # the indices of a coalesced gradient: valid by construction, and the optimiser need not sort again
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


class MLPBackbone(Backbone):
    """The MLP backbone (`model.encoder = "mlp"`). `output_owner` (the last layer's owners, shared by both
    towers) defines the groups."""

    devices = ("cpu", "cuda")

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
        recent: RecentHistory | None = None,
    ):
        """context: per-row context column -> rows of its table (codes + unknown), read by the user tower;
        context_hashed: column -> buckets, for a column whose codes are hashed (more than max_categories);
        recent: the latest items a bag reads per behaviour (model.history_max)."""
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
        self.recent = recent or RecentHistory()
        self.bag_matrices: dict[str, sp.csr_matrix] = {}

    @classmethod
    def can_stream(cls, model_cfg) -> bool:
        # a step reads its batch's rows; the history bags read the bounded histories the trainer builds from the
        # cache once (csmf.data.stream_history), not every user's training rows
        return True

    @classmethod
    def build(cls, data, cfg, seed: int, objectives: tuple[str, ...],
              context_sizes: dict[str, int]) -> MLPBackbone:  # fmt: skip
        """The backbone `cfg.model` describes over `data`'s users, items, behaviours and features."""
        m = cfg.model
        rows, hashed = context_tables(context_sizes, m) if m.features and m.context else ({}, {})
        return cls(
            n_users=data.n_users, n_items=data.n_items, dim=m.dim, user_hidden=m.user_hidden,
            item_hidden=m.item_hidden, id_dim=m.id_dim, user_id_dim=m.id_dim if m.user_id else 0,
            history_dim=m.history_dim, behaviours=data.behaviours if m.history else (),
            user_features=features_of(data.user_features, m), item_features=features_of(data.item_features, m),
            feature_dim=m.feature_dim, seed=seed, dropout=m.dropout, bag_power=m.bag_power, context=rows,
            context_hashed=hashed, recent=RecentHistory(m.history_max, data.recency, seed),
        )  # fmt: skip

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
        if self.recent.limit > 0:  # each behaviour's latest items only (model.history_max)
            rows = [self.recent.rows(source[b], users) for b in self.behaviours]
            return pool_bags(self.user.history.weight, rows, np.arange(len(users)), leave_out, self.bag_power,
                             self.user.history.sparse)  # fmt: skip
        matrices = [source[b] for b in self.behaviours]
        return pool_bags(self.user.history.weight, matrices, users, leave_out, self.bag_power, self.user.history.sparse)

    @property
    def reads_context(self) -> bool:
        return len(self.user.ctx_emb) > 0

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

    def place(self, device: torch.device) -> MLPBackbone:
        """Move the weights and the feature tensors to `device` (training on a GPU)."""
        self.to(device)
        self.user.features, self.item.features = self.user.features.to(device), self.item.features.to(device)
        return self

    def mask_grads(self, stage: int) -> None:
        self.user.mask_grads(stage)
        self.item.mask_grads(stage)

    def sync_output_owner(self) -> None:
        """Both towers' last layers share one owner vector: a dimension is one stage's in u and in v."""
        self.item.layers[-1].owner.copy_(self.user.layers[-1].owner)

    def sparse_tables(self) -> list[MaskedEmbedding]:
        """The ID tables and the history table (one row per item; its bags then pool with embedding_bag)."""
        tables = [t.id_emb for t in (self.user, self.item) if t.id_emb.weight.shape[1] > 0]
        return tables + ([self.user.history] if self.user.history is not None else [])

    def row_tables(self) -> dict[str, nn.Parameter]:
        """The user and item ID embeddings (a batch reads its own users' and items' rows)."""
        return {f"{name}.id_emb.weight": t.id_emb.weight for name, t in (("user", self.user), ("item", self.item))
                if t.id_emb.weight.shape[1] > 0}  # fmt: skip

    def entity_tables(self) -> dict[str, tuple[str, str | None]]:
        """The ID embeddings (a zero-width one too: its shape follows the ids), the history table (one row per
        item) and the feature embeddings (one row per value)."""
        out: dict[str, tuple[str, str | None]] = {}
        for side, tower in (("user", self.user), ("item", self.item)):
            out[f"{side}.id_emb.weight"] = (side, None)
            out |= {f"{side}.feat_emb.{name}.weight": (side, name) for name in tower.feat_emb}
        if self.user.history is not None:
            out["user.history.weight"] = ("item", None)
        return out

    def prunable(self) -> list[UnitGroup]:
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

    # ----- export ------------------------------------------------------------------------------
    @torch.no_grad()
    def export_towers(self, top: int, user_columns: list[dict],
                      item_columns: list[dict]) -> tuple[TowerExport, TowerExport | None]:  # fmt: skip
        """x = the entity's fixed inputs (ID embedding, features, unknown context; zeros for a new one, whose
        features fill their slots) with each behaviour's bag in its slot, then the masked MLP folded at `top`."""
        tower = self.user
        users = torch.arange(tower.id_emb.weight.shape[0])
        width = tower.history.weight.shape[1] if tower.history is not None else 0
        parts = [(tower.id_emb(users, top), True)]  # (inputs of every known user, whether only they have it)
        slots = []  # where each behaviour's bag goes in the input
        for _ in self.behaviours if tower.history is not None else ():
            slots.append(sum(p.shape[1] for p, _ in parts))
            parts.append((torch.zeros(len(users), width), False))
        feature_slots = []
        for name, e in tower.feat_emb.items():
            feature_slots.append(sum(p.shape[1] for p, _ in parts))
            parts.append((tower.features.lookup(name, users, e.weight) * e.column_mask(top), True))
        parts += [(e(torch.zeros_like(users), top), False) for e in tower.ctx_emb.values()]  # context unknown
        dense_slot = sum(p.shape[1] for p, _ in parts)
        if tower.features.dense is not None:
            parts.append((tower.features.dense[users], True))
        fixed = torch.cat([p for p, _ in parts], dim=1)
        new_user = torch.cat([p[0] * (0.0 if known else 1.0) for p, known in parts])  # no ID, no features
        arrays = {"fixed": fixed.numpy(), "new_user": new_user.numpy()}
        if tower.history is not None:
            arrays["history_table"] = (tower.history.weight * tower.history.column_mask(top)).numpy()
        arrays |= _folded_layers(tower, top, "")
        arrays |= {f"ufeat{j}": (e.weight * e.column_mask(top)).numpy() for j, e in enumerate(tower.feat_emb.values())}
        user = {"kind": "mlp", "behaviours": list(self.behaviours) if tower.history is not None else [],
                "slots": slots, "bag_power": float(self.bag_power), "layers": len(tower.layers),
                "features": {"columns": user_columns, "slots": feature_slots, "dense_slot": dense_slot}}  # fmt: skip
        items = self.item
        if not items.feat_emb and items.features.dense is None:
            return (user, arrays), None
        start = items.id_emb.weight.shape[1]  # a new item has no ID row: zeros there
        item_slots, width = [], start
        for e in items.feat_emb.values():
            item_slots.append(width)
            width += e.weight.shape[1]
        item_arrays = _folded_layers(items, top, "i")
        item_arrays |= {
            f"ifeat{j}": (e.weight * e.column_mask(top)).numpy() for j, e in enumerate(items.feat_emb.values())
        }
        item = {"kind": "mlp", "layers": len(items.layers), "width": width + items.features.n_dense,
                "features": {"columns": item_columns, "slots": item_slots, "dense_slot": width}}  # fmt: skip
        return (user, arrays), (item, item_arrays)


def _folded_layers(tower: Tower, top: int, prefix: str) -> dict[str, np.ndarray]:
    """Each linear layer's weight and bias with the masks of stage `top` multiplied in."""
    out, owner_in = {}, tower.input_owner()
    for n, layer in enumerate(tower.layers):
        out[f"{prefix}w{n}"] = (layer.weight * usable(layer.owner, owner_in, top).float()).numpy()
        out[f"{prefix}b{n}"] = (layer.bias * active(layer.owner, top).float()).numpy()
        owner_in = layer.owner
    return out
