"""A cascade whose split is given by the release's own files (Ali-CCP, AliExpress): train trains, val selects,
test reports. Shared by the loaders of such releases.

Every file's rows are normalised first (`user_id`, `item_id`, one 0/1 column per stage, feature columns);
the id maps and features come from all files together. The leak rule then holds by construction: a
validation or test pair that is also a training pair of its stage or a later one is dropped (a pair the
model was trained on is not a held-out pair; a purchase reveals the click before it), and a validation
pair that is also a test pair leaves validation. The load report counts both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

import csmf.data.context as context
from csmf.data.logtable import Concatenated, log_from_table
from csmf.data.schema import CascadeData, LoadReport, difference, pairs_to_csr, union
from csmf.data.sources import dictionary
from csmf.data.split import finish_report

SPLITS = ("train", "val", "test")


def cascade_from_files(
    name: str,
    tables: dict[str, pa.Table],
    sources: dict[str, list[tuple[Path, int]]],
    stages: tuple[str, ...],
    note: str,
    user_features: tuple[str, ...] | None = None,
    item_features: tuple[str, ...] | None = None,
    context_features: tuple[str, ...] = (),
) -> CascadeData:
    """tables: split ("train", "val", "test") -> normalised rows; sources: split -> (file, rows) in row order."""
    order = [s for s in SPLITS if s in tables]
    combined = pa.concat_tables([tables[s] for s in order], promote_options="default")
    where = Concatenated([part for s in order for part in sources[s]])
    log = log_from_table(
        combined, where, stages, user_features=user_features, item_features=item_features,
        context_features=context_features,
    )  # fmt: skip
    users_of, items_of = pa.array(log.user_ids), pa.array(log.item_ids)

    def pairs(split: str) -> dict[str, sp.csr_matrix]:
        t = tables[split]
        u = pc.index_in(t.column("user_id"), value_set=users_of).to_numpy(zero_copy_only=False)
        i = pc.index_in(t.column("item_id"), value_set=items_of).to_numpy(zero_copy_only=False)
        out = {}
        for s in stages:
            on = np.asarray(t.column(s).to_numpy(zero_copy_only=False), dtype=bool)
            out[s] = pairs_to_csr(u[on], i[on], log.n_users, log.n_items)
        return out

    train, valid, test = pairs("train"), pairs("val"), pairs("test")
    report = log.report
    apply_leak_rule(stages, train, valid, test, report)
    report.notes.append(note)
    data = CascadeData(
        name=name, stages=stages, n_users=log.n_users, n_items=log.n_items,
        train=train, valid=valid, test=test, exclude={s: stages for s in stages},
        user_ids=log.user_ids, item_ids=log.item_ids,
        user_features=log.user_features, item_features=log.item_features, report=report,
        context=context.matrices(log.context, log.users, log.items, log.n_users, log.n_items),
    )  # fmt: skip
    finish_report(data, report)
    return data


def apply_leak_rule(
    stages: tuple[str, ...],
    train: dict[str, sp.csr_matrix],
    valid: dict[str, sp.csr_matrix],
    test: dict[str, sp.csr_matrix],
    report: LoadReport,
) -> None:
    """In place: held-out pairs that are training pairs of their stage or a later one leave the held-out side,
    and validation pairs that are test pairs leave validation; the report counts both."""
    for k, s in enumerate(stages):
        trained = union(*(train[later] for later in stages[k:]))
        for label, held in (("test", test), ("validation", valid)):
            kept = difference(held[s], trained)
            report.skip(f"{s} {label} pairs that are also training pairs (not held out)", held[s].nnz - kept.nnz)
            held[s] = kept
        kept = difference(valid[s], test[s])
        report.skip(f"{s} validation pairs that are also test pairs", valid[s].nnz - kept.nnz)
        valid[s] = kept


def holdout_by_key(keys: pa.ChunkedArray | pa.Array, share: float, seed: int) -> np.ndarray:
    """Bool per row: its key (a search, a user) is among a seeded `share` of the distinct keys. Rows of one
    key stay together, so a held-out key is as new to the model as a test key."""
    encoded = dictionary(keys)
    n = len(encoded.dictionary)
    chosen = np.zeros(n, dtype=bool)
    rng = np.random.default_rng([seed, 7])
    chosen[rng.permutation(n)[: int(round(share * n))]] = True
    return chosen[encoded.indices.to_numpy(zero_copy_only=False)]
