"""Models behind the common Retriever interface, and the registry that loads any of them from a folder."""

from __future__ import annotations

from pathlib import Path

from csmf.checkpoints import CheckpointError
from csmf.models.als import ALS, ALSSettings
from csmf.models.csmf import CSMF
from csmf.models.ease import EASE
from csmf.models.itemknn import ItemKNN, ItemKNNSettings
from csmf.models.multitask import MultiTask
from csmf.models.popularity import Popularity
from csmf.models.saving import read_model
from csmf.retriever import Retriever

# the kind a saved model's metadata names -> the class whose `load` rebuilds it
KINDS: dict[str, type[Retriever]] = {"csmf": CSMF, "multitask": MultiTask, "als": ALS, "itemknn": ItemKNN,
                                     "ease": EASE, "popularity": Popularity}  # fmt: skip


def load_model(folder: str | Path) -> Retriever:
    """Whichever model saved `folder`: CSMF (and its variants), a multi-task tower, or a classical peer."""
    meta, _, _, _ = read_model(folder)
    if meta.get("kind") not in KINDS:
        raise CheckpointError(f"{folder}: unknown model kind {meta.get('kind')!r}; known: {sorted(KINDS)}")
    return KINDS[meta["kind"]].load(folder)


__all__ = ["ALS", "CSMF", "EASE", "KINDS", "ALSSettings", "ItemKNN", "ItemKNNSettings", "MultiTask", "Popularity",
           "Retriever", "load_model"]  # fmt: skip
