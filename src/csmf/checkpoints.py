"""Checkpoint files that can hold weights and nothing else.

A checkpoint is a torch file read with `weights_only=True`: tensors, plus one JSON string with what
the run needs to resume (phase, history, config, data fingerprint). torch's weights-only unpickler
refuses any other object, so a crafted file placed in a run folder or the pretrain cache cannot run
code when csmf reads it: it is refused with the file named.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not csmf's, or from another run. Names the file."""


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """Write atomically: a checkpoint is either complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    state = {k: v.detach().cpu() for k, v in state.items()}  # a GPU run's checkpoint resumes anywhere
    torch.save({"state": state, "meta": json.dumps(meta, default=float)}, tmp)  # numpy scalars as floats
    tmp.replace(path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, meta) of a checkpoint `save_checkpoint` wrote; anything else is a CheckpointError."""
    try:
        raw = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused: not a checkpoint csmf wrote (csmf reads weights only, never code): {first}. "
            "Delete the file, or train into a new --out folder"
        ) from None
    if not (isinstance(raw, dict) and isinstance(raw.get("state"), dict) and isinstance(raw.get("meta"), str)):
        raise CheckpointError(f"{path}: refused: not a checkpoint of this csmf version; train into a new --out folder")
    try:
        meta = json.loads(raw["meta"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({err}); train into a new --out folder") from None
    return raw["state"], meta
