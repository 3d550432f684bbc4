"""Helpers the classical models share (the Retriever contract itself is csmf.retriever)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from csmf.data.schema import CascadeData


def input_matrix(data: CascadeData, stage: str, aux_weight: float) -> sp.csr_matrix:
    """The stage's train pairs plus every other train behaviour at weight `aux_weight`.

    Auxiliary behaviours (views for a purchase model, purchases for a view model) are legitimate
    training input: the split guarantees no test pair of `stage` is in them.
    """
    mat = data.train[stage].astype(np.float32).copy()
    if aux_weight > 0:
        for name in data.behaviours:
            if name != stage:
                mat = mat + aux_weight * data.matrix(name)
    mat = sp.csr_matrix(mat, dtype=np.float32)
    mat.sort_indices()
    return mat
