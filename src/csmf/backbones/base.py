"""What a backbone offers the cascade: the one seam between an encoder and everything that trains, scores,
prunes or exports it.

The trainer (csmf.cascade), the stage loss (csmf.stage_loss), scoring (csmf.trained) and export talk to a
backbone only through this class; none of them asks which backbone it is. A new encoder subclasses Backbone,
implements the abstract methods, overrides the hooks whose default does not fit, and is registered by name in
csmf.backbones (the value of `model.encoder`).

Units and owners (method notes §2): every prunable unit (an embedding column, a hidden unit, an output
dimension) has an owner, 0 = free, 1..S = the stage that owns it. `prunable()` lists the unit groups CPP
works on; `output_owner` says which stage owns each of the D output dimensions, shared by user and item
vectors, so objective k scores with the dimensions owned by stages 1..k.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from csmf.masks import active

# one unit group: (name, magnitude of each unit, the owner buffer CPP rewrites in place)
UnitGroup = tuple[str, torch.Tensor, torch.Tensor]
# an exported tower: (its manifest entry, its arrays), csmf.serving.online_towers reads both
TowerExport = tuple[dict, dict[str, np.ndarray]]


class Backbone(nn.Module, ABC):
    """An owner-masked two-tower encoder: users and items -> D-wide vectors, per cascade stage."""

    # the devices it trains on (runtime.device); the trained model is always handed back on the CPU
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    # True: its full-catalogue loss takes every positive of a batch of users at once (one softmax per user),
    # because each step computes every item vector anyway (graph propagation); False: batches of pairs
    per_user_loss: ClassVar[bool] = False
    # the behaviours whose training history the backbone reads (set_history gets at least these)
    behaviours: tuple[str, ...] = ()
    n_items: int  # the catalogue: item rows 0..n_items-1

    @classmethod
    def can_stream(cls, model_cfg) -> bool:
        """Whether it trains on pairs streamed from the cache (train.stream) with these `model` settings: only an
        encoder whose step reads its batch's rows and at most each user's bounded history (built once from the cache,
        csmf.data.stream_history), not a graph over every user's rows, can."""
        return False

    @classmethod
    @abstractmethod
    def build(cls, data, cfg, seed: int, objectives: tuple[str, ...], context_sizes: dict[str, int]) -> Backbone:
        """The backbone `cfg.model` describes over `data` (a CascadeData) for `objectives`, with its initial
        weights drawn from `seed`; context_sizes: the per-row context tables' sizes (csmf.backbones.build_backbone)."""

    # ----- inputs ----------------------------------------------------------------------------------
    @abstractmethod
    def set_history(self, matrices: dict[str, sp.csr_matrix]) -> None:
        """Binary users x items training matrices (one per behaviour) the backbone reads users' histories from."""

    @property
    def reads_context(self) -> bool:
        """Whether the user tower embeds per-row request context (csmf.data.context)."""
        return False

    # ----- vectors ---------------------------------------------------------------------------------
    @abstractmethod
    def user_vectors(
        self,
        users: np.ndarray,
        stage: int,
        leave_out: np.ndarray | None = None,
        history: dict[str, sp.csr_matrix] | None = None,
        context: dict[str, np.ndarray] | None = None,
    ) -> torch.Tensor:
        """(B, D) at `stage`. leave_out[b]: an item a training row's own history must not show (its target);
        history: other matrices than the training ones (evaluation); context: column -> (B,) codes."""

    @abstractmethod
    def item_vectors(self, stage: int, items: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) every item's vector at `stage`, or (B, D) those of `items`."""

    def vectors(
        self, users: np.ndarray, stage: int, history: dict[str, sp.csr_matrix] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(user vectors (B, D), every item's vector (N, D)) at `stage`: what the full-catalogue loss scores."""
        return self.user_vectors(users, stage, history=history), self.item_vectors(stage)

    # ----- units and owners ------------------------------------------------------------------------
    @property
    @abstractmethod
    def output_owner(self) -> torch.Tensor:
        """(D,) the stage owning each output dimension (0 = free)."""

    @abstractmethod
    def prunable(self) -> list[UnitGroup]:
        """Every unit group CPP may prune, in a stable order; the output dimensions are the group "output"."""

    @abstractmethod
    def mask_grads(self, stage: int) -> None:
        """After backward: zero every gradient `stage` may not change (units it does not own, inputs it may not
        read), so earlier stages' parameters stay bit-identical."""

    def sync_output_owner(self) -> None:
        """After owners changed: make every copy of the output owners agree (one dimension, one stage)."""

    def group_mask(self, stage: int) -> torch.Tensor:
        """(D,) 1 on the output dimensions objective `stage` scores with (owners 1..stage)."""
        return active(self.output_owner, stage).float()

    def ownership(self) -> dict[str, dict[int, float]]:
        """Per unit group: the share of units each owner (0 = free) holds."""
        return ownership(self.prunable())

    # ----- training hooks --------------------------------------------------------------------------
    def bag_self_weights(
        self, users: np.ndarray, stage: int, rows: np.ndarray, items: np.ndarray
    ) -> torch.Tensor | None:
        """(P, D) or None: for the pairs (users[rows[p]], items[p]) whose item is in its user's own bag, the weight
        that item's vector carries in the user vector on each output column, so the loss can take the item's share
        of its own score out (leave-target-out, `model.graph_leave_target_out`). None: the user vector does not
        read the training targets (the MLP leaves them out itself)."""
        return None

    def row_tables(self) -> dict[str, nn.Parameter]:
        """ID tables (name -> parameter, rows = entities) whose gradient a batch touches in a few rows only: with
        several processes the large ones are averaged row-sparse (csmf.distributed.reduce_rows)."""
        return {}

    def sparse_tables(self) -> list[nn.Module]:
        """ID tables that may take sparse gradients (a step then moves only the rows a batch touched); each has
        a `weight` and a `sparse` switch. Asked for when training streams a large catalogue."""
        return []

    def entity_tables(self) -> dict[str, tuple[str, str | None]]:
        """The state_dict keys of the tables whose rows are entities or feature values, each with ("user" or "item",
        None) for one row per user or item id, or (side, column) for one row per value of that side's feature column
        (a categorical column's sorted values, a hashed column's buckets, a bag's codes). A warm start on new data
        (csmf.refresh) maps these row by row onto the new id maps; every other parameter keeps its shape."""
        return {}

    @contextlib.contextmanager
    def training_stage(self, stage: int) -> Iterator[None]:
        """Held while `stage` trains: a backbone may cache what earlier, frozen stages compute."""
        yield

    def place(self, device: torch.device) -> Backbone:
        """The weights and every input tensor on `device`."""
        self.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.output_owner.device

    # ----- export ----------------------------------------------------------------------------------
    @abstractmethod
    def export_towers(self, top: int, user_columns: list[dict],
                      item_columns: list[dict]) -> tuple[TowerExport, TowerExport | None]:  # fmt: skip
        """The user tower (and the item tower, when items have features) at stage `top` with every stage mask
        folded in, as arrays numpy alone can run (csmf.serving.online_towers). *_columns: how each raw feature
        column becomes an input (csmf.serving.featurecodes.encoders). Runs without autograd (no caller's no_grad
        needed); the caller puts the model in eval mode."""


def ownership(groups: list[UnitGroup]) -> dict[str, dict[int, float]]:
    """Per unit group (name, magnitude, owner): the fraction of units each owner (0 = free) holds."""
    table = {}
    for name, _, owner in groups:
        values, counts = torch.unique(owner, return_counts=True)
        table[name] = {int(v): round(float(c) / len(owner), 4) for v, c in zip(values, counts, strict=False)}
    return table
