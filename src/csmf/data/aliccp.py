"""Ali-CCP (Ma et al., SIGIR 2018, ESMM; Tianchi dataset 408) in its processed CSV layout, mapped onto the
cascade with the release's own train / validation / test files as the split.

Files read from a folder: `ali_ccp_train.csv`, `ali_ccp_val.csv`, `ali_ccp_test.csv` (the processed
release, as torch-rechub's preprocessing names them), or the `_sample` names of the fixtures in
../shared/data/ali-ccp-sample. Columns: `click`, `purchase`, the sparse feature fields by their field id
(`101` = user id, `205` = item id, 121..129 user profile, 206.. item side, 301 scenario, ...) and dense
`D*` columns. Stages: exposure = every row, click = `click`, purchase = `purchase`.

The split keeps the release's files: train trains, val selects, test reports. A validation or test pair
that is also a training pair of its stage or a later one is dropped (a pair the model was trained on is
not a held-out pair), and a validation pair that is also a test pair leaves validation; the load report
counts both. Feature columns constant within every user (item) become user (item) features. Every error
names the file and line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from csmf.data.errors import DataError
from csmf.data.logtable import Concatenated, Locator, check_stage, log_from_table, read_table
from csmf.data.schema import CascadeData, difference, pairs_to_csr, union
from csmf.data.split import finish_report

SPLITS = ("train", "val", "test")
STAGES = ("exposure", "click", "purchase")
USER_FIELD, ITEM_FIELD = "101", "205"


def aliccp_files(folder: Path) -> dict[str, Path]:
    """split -> file; an error lists the names it looked for."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; give the folder holding the Ali-CCP csv files")
    files = {}
    for split in SPLITS:
        names = (f"ali_ccp_{split}.csv", f"ali_ccp_{split}_sample.csv")
        found = [folder / n for n in names if (folder / n).exists()]
        if not found:
            raise DataError(f"{folder}: no Ali-CCP {split} file; expected {names[0]} (or {names[1]})")
        files[split] = found[0]
    return files


def load_aliccp(folder: str | Path) -> CascadeData:
    folder = Path(folder)
    files = aliccp_files(folder)
    tables, sizes, labels = {}, [], {}
    for split, path in files.items():
        table = read_table(path)
        missing = [c for c in ("click", "purchase", USER_FIELD, ITEM_FIELD) if c not in table.column_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; columns are {table.column_names}")
        where = Locator(path)
        click, purchase = check_stage(table, "click", where), check_stage(table, "purchase", where)
        if (purchase & ~click).any():
            row = int(np.flatnonzero(purchase & ~click)[0])
            raise DataError(f"{where(row)}: purchase 1 without a click; Ali-CCP purchases follow clicks")
        labels[split] = np.stack([np.ones(table.num_rows, dtype=bool), click, purchase], axis=1)
        features = [c for c in table.column_names if c not in ("click", "purchase", USER_FIELD, ITEM_FIELD)]
        out = {"user_id": table.column(USER_FIELD), "item_id": table.column(ITEM_FIELD),
               "exposure": pa.array(np.ones(table.num_rows, dtype=np.int8)),
               "click": pa.array(click.astype(np.int8)), "purchase": pa.array(purchase.astype(np.int8))}  # fmt: skip
        out |= {c: table.column(c) for c in features}
        tables[split] = pa.table(out)
        sizes.append((path, table.num_rows))
    combined = pa.concat_tables(tables.values(), promote_options="default")
    log = log_from_table(combined, Concatenated(sizes), STAGES)  # the id maps and features of every file
    users_of, items_of = pa.array(log.user_ids), pa.array(log.item_ids)

    def pairs(split: str) -> dict[str, sp.csr_matrix]:
        t = tables[split]
        u = pc.index_in(t.column("user_id"), value_set=users_of).to_numpy(zero_copy_only=False)
        i = pc.index_in(t.column("item_id"), value_set=items_of).to_numpy(zero_copy_only=False)
        return {s: pairs_to_csr(u[labels[split][:, k]], i[labels[split][:, k]], log.n_users, log.n_items)
                for k, s in enumerate(STAGES)}  # fmt: skip

    train, valid, test = pairs("train"), pairs("val"), pairs("test")
    report = log.report
    for k, s in enumerate(STAGES):
        trained = union(*(train[later] for later in STAGES[k:]))  # a purchase reveals the click before it
        for name, held in (("test", test), ("validation", valid)):
            kept = difference(held[s], trained)
            report.skip(f"{s} {name} pairs that are also training pairs (not held out)", held[s].nnz - kept.nnz)
            held[s] = kept
        kept = difference(valid[s], test[s])
        report.skip(f"{s} validation pairs that are also test pairs", valid[s].nnz - kept.nnz)
        valid[s] = kept
    report.notes.append("Ali-CCP: the release's train / val / test files are the split; exposure = every row")
    data = CascadeData(
        name="aliccp", stages=STAGES, n_users=log.n_users, n_items=log.n_items,
        train=train, valid=valid, test=test, exclude={s: STAGES for s in STAGES},
        user_ids=log.user_ids, item_ids=log.item_ids,
        user_features=log.user_features, item_features=log.item_features, report=report,
    )  # fmt: skip
    finish_report(data, report)
    return data
