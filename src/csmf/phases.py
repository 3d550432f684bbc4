"""The cascade's plan and the two phases that change ownership, as pure functions of a backbone's owners.

plan: per stage, train (stage 1 pretrains, later stages fine-tune their claimed units), then, when a stage
follows, prune (CPP or PackNet's fixed share frees units) and recover (AR re-trains what stayed). `claim` starts
a fine-tuning stage by giving it the free units; `prune` decides which of a trained stage's units to free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from csmf.backbones.base import Backbone
from csmf.config import CascadeConfig, Config, per_stage
from csmf.masks import claim_free
from csmf.prune import cpp_free, fixed_free, release


@dataclass(frozen=True)
class Phase:
    kind: str  # "train" (pretrain / fine-tune), "prune" (CPP), "recover" (AR)
    stage: int  # 1-based position in the cascade

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.stage}"


def plan(n_stages: int, cfg: Config) -> list[Phase]:
    phases = []
    for k in range(1, n_stages + 1):
        phases.append(Phase("train", k))
        if k < n_stages and cfg.cascade.prune != "none":
            phases.append(Phase("prune", k))
            if cfg.cascade.recover_frac > 0:
                phases.append(Phase("recover", k))
    return phases


def claim(model: Backbone, stage: int, naive: bool = False) -> None:
    """Start of fine-tuning stage `stage`: the free units become its own. `naive` (naive fine-tuning): the
    stage takes every unit, so it trains all weights and earlier objectives are not protected."""
    for _, _, owner in model.prunable():
        owner.copy_(torch.where(owner >= 1, stage, owner) if naive else claim_free(owner, stage))
    model.sync_output_owner()


def prune(model: Backbone, stage: int, c: CascadeConfig, n_stages: int, output_floor: int | None = None) -> dict:
    """CPP (or PackNet's fixed share) after stage `stage` trained: free the units the next stage will own.

    Pruning happens only when a later stage follows: each group frees at least one unit for it (without an
    output dimension of its own, the next objective would just repeat this one), and the output dimensions
    keep `min_share` of D for each stage still to come (`output_floor`: another least number of output units to
    free, csmf.extend's). Returns the phase record (criterion, tau, shares).
    """
    groups = model.prunable()
    tau = per_stage(c.tau, stage)
    to_come = n_stages - stage
    reserve = max(1, math.ceil(c.min_share * len(model.output_owner) * to_come - 1e-9))
    floor = {"output": reserve if output_floor is None else output_floor}
    cpp = {name: cpp_free(mag, owner, stage, tau, min_free=floor.get(name, 1)) for name, mag, owner in groups}
    if c.prune == "cpp":
        frees = cpp
    elif c.prune == "fixed":
        owned = sum(int((owner == stage).sum()) for _, _, owner in groups)
        share = c.fixed_fraction if c.fixed_fraction >= 0 else sum(int(f.sum()) for f in cpp.values()) / owned
        frees = {name: fixed_free(mag, owner, stage, share, min_free=floor.get(name, 1)) for name, mag, owner in groups}
    else:
        raise ValueError(f"cascade.prune must be 'cpp', 'fixed' or 'none', got {c.prune!r}")
    before = [owner.clone() for _, _, owner in groups]
    for name, _, owner in groups:
        owner.copy_(release(owner, frees[name]))
    model.sync_output_owner()
    freed = {name: round(float(f.float().mean()), 4) for name, f in frees.items()}
    # what tau alone frees against the floor, per group: whether CPP's criterion decided this prune at all
    bound = {
        name: {
            "tau_units": int(cpp_free(mag, owner_before, stage, tau).sum()),
            "floor_units": floor.get(name, 1),
            "freed_units": int(frees[name].sum()),
        }  # fmt: skip
        for (name, mag, _), owner_before in zip(groups, before, strict=True)
    }
    return {"criterion": c.prune, "tau": tau, "freed_share": freed, "bound": bound}
