"""Unit-level stage ownership (design (B) of the method notes, §2): owners and the masks derived from them.

Every unit (a hidden neuron, an output dimension, an embedding column) has an integer owner:
0 = free, 1..S = the stage that owns it. Masks are computed from owners on the fly and multiplied in
during the forward pass; weights are never overwritten. Cascade isolation: weight W[j, i] (unit j
reading unit i) is usable at stage k only when 1 <= owner(i) <= owner(j) <= k, so a later stage's unit
never feeds an earlier one and training stage k cannot change the outputs of stages < k.
"""

from __future__ import annotations

import torch


def active(owner: torch.Tensor, stage: int) -> torch.Tensor:
    """Units that take part in the forward pass of `stage`: owned by stages 1..stage."""
    return (owner >= 1) & (owner <= stage)


def usable(owner_out: torch.Tensor, owner_in: torch.Tensor, stage: int) -> torch.Tensor:
    """(out, in) bool: W[j, i] is used at `stage` iff 1 <= owner_in[i] <= owner_out[j] <= stage."""
    out_ok = active(owner_out, stage).unsqueeze(1)  # (out, 1)
    in_ok = (owner_in >= 1).unsqueeze(0) & (owner_in.unsqueeze(0) <= owner_out.unsqueeze(1))  # (out, in)
    return out_ok & in_ok


def trainable_rows(owner_out: torch.Tensor, stage: int) -> torch.Tensor:
    """Units whose incoming weights and bias `stage` may update: the ones it owns."""
    return owner_out == stage


def claim_free(owner: torch.Tensor, stage: int) -> torch.Tensor:
    """Free units (owner 0) become `stage`'s: the start of a fine-tuning stage."""
    return torch.where(owner == 0, torch.full_like(owner, stage), owner)
