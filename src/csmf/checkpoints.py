"""Checkpoint files that can hold weights and nothing else.

A checkpoint is a torch file read with `weights_only=True`: tensors, plus one JSON string with what
the run needs to resume (phase, history, config, data fingerprint). torch's weights-only unpickler
refuses any other object, so a crafted file placed in a run folder or the pretrain cache cannot run
code when csmf reads it: it is refused with the file named.

Each checkpoint also carries the sha256 of its content (the metadata and every tensor's name, dtype, shape and
bytes), checked on load: torch's reader does not check the bytes of a tensor, so one changed byte (a disk or
copy error) would otherwise be resumed from, or exported, as if it were the trained weights. A digest catches
damage, not someone who rewrites the file and its digest together: keep run folders where only you write.
Checkpoints from before the digest load unchecked, with a note.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not csmf's, damaged, or from another run. Names the file."""


# what to do about a damaged checkpoint of a run folder: the phase before it is intact and resumable
RETRAIN_FIX = ("delete this file to train its phase again from the one before it, or give --overwrite to train the "
               "run from scratch")  # fmt: skip
_noted: set[Path] = set()  # older checkpoints already noted in this process (a resume reads the last one twice)


def content_digest(state: dict[str, torch.Tensor], meta: str) -> str:
    """sha256 of a checkpoint's content: its JSON metadata, then each tensor's name, dtype, shape and raw bytes in
    name order (bytes of any dtype, bfloat16 included, through a uint8 view)."""
    digest = hashlib.sha256(meta.encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        tensor = (tensor if tensor.layout == torch.strided else tensor.to_dense()).contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)  # the array's buffer, not a copy
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """Write atomically: a checkpoint is either complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    state = {k: v.detach().cpu() for k, v in state.items()}  # a GPU run's checkpoint resumes anywhere
    text = json.dumps(meta, default=float)  # numpy scalars as floats
    torch.save({"state": state, "meta": text, "sha256": content_digest(state, text)}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, fix: str = RETRAIN_FIX) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, meta) of a checkpoint `save_checkpoint` wrote; anything else is a CheckpointError. `fix`: what
    the message of a damaged file tells the user to do."""
    try:
        raw = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused: not a checkpoint csmf wrote (csmf reads weights only, never code): {first}. "
            "Delete the file, or train into a new --out folder"
        ) from None
    state = raw.get("state") if isinstance(raw, dict) else None
    if not (isinstance(state, dict) and isinstance(raw.get("meta"), str)
            and all(isinstance(t, torch.Tensor) for t in state.values())):  # fmt: skip
        raise CheckpointError(f"{path}: refused: not a checkpoint of this csmf version; train into a new --out folder")
    if "sha256" not in raw:
        if path not in _noted:
            _noted.add(path)
            logger.warning(f"csmf: note: {path} carries no content digest (saved by an older csmf): loaded without "
                           "a damage check")  # fmt: skip
    elif not isinstance(raw["sha256"], str) or raw["sha256"] != content_digest(raw["state"], raw["meta"]):
        raise CheckpointError(f"{path}: damaged: its content does not match the sha256 digest saved with it (a "
                              f"changed byte: a disk or copy error, or an edit); {fix}")  # fmt: skip
    try:
        meta = json.loads(raw["meta"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({err}); train into a new --out folder") from None
    return raw["state"], meta
