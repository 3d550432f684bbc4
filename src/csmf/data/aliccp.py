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

from csmf.data.aliccp_raw import has_raw_layout, raw_files, read_raw
from csmf.data.context import resolve, wanted
from csmf.data.errors import DataError
from csmf.data.filesplit import SPLITS, cascade_from_files
from csmf.data.logtable import Locator, check_stage, read_table
from csmf.data.schema import CascadeData

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


def _rows(table: pa.Table, path: Path, where) -> dict[str, pa.Array]:
    """A block of a processed Ali-CCP file as the cascade's columns; the checks name the file and line."""
    missing = [c for c in ("click", "purchase", USER_FIELD, ITEM_FIELD) if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {table.column_names}")
    click, purchase = check_stage(table, "click", where), check_stage(table, "purchase", where)
    if (purchase & ~click).any():
        row = int(np.flatnonzero(purchase & ~click)[0])
        raise DataError(f"{where(row)}: purchase 1 without a click; Ali-CCP purchases follow clicks")
    features = [c for c in table.column_names if c not in ("click", "purchase", USER_FIELD, ITEM_FIELD)]
    out = {"user_id": table.column(USER_FIELD), "item_id": table.column(ITEM_FIELD),
           "exposure": pa.array(np.ones(table.num_rows, dtype=np.int8)),
           "click": pa.array(click.astype(np.int8)), "purchase": pa.array(purchase.astype(np.int8))}  # fmt: skip
    return out | {c: table.column(c) for c in features}


def load_aliccp(
    folder: str | Path, valid_frac: float = 0.1, seed: int = 0, context_features: tuple[str, ...] | None = None
) -> CascadeData:
    """Ali-CCP from `folder`: the raw release (sample_skeleton / common_features) when it is there, else the
    processed CSVs. valid_frac and seed only apply to the raw release, which has no validation file.
    context_features: per-row context columns; None = the scenario field 301 (csmf.data.context)."""
    from csmf.data.aliccp_raw import CONTEXT_FIELDS

    folder = Path(folder)
    if has_raw_layout(folder):
        return load_aliccp_raw(folder, valid_frac, seed, context_features)
    files = aliccp_files(folder)
    tables, sources = {}, {}
    for split, path in files.items():
        table = read_table(path)
        tables[split] = pa.table(_rows(table, path, Locator(path)))
        sources[split] = [(path, table.num_rows)]
    note = "Ali-CCP: the release's train / val / test files are the split; exposure = every row"
    columns = set().union(*(t.column_names for t in tables.values()))
    context = resolve(context_features, CONTEXT_FIELDS, columns)
    return cascade_from_files("aliccp", tables, sources, STAGES, note, context_features=context)


def load_aliccp_raw(
    folder: Path, valid_frac: float = 0.1, seed: int = 0, context_features: tuple[str, ...] | None = None
) -> CascadeData:
    """The raw release: test = sample_skeleton_test; validation = a seeded `valid_frac` of the training
    impressions (the release has no validation file); train = the other training impressions."""
    tables, sources, lists = {}, {}, {}
    for split in ("train", "test"):
        parts = []
        for block, counts in read_raw(folder, split):
            parts.append(block)
            for field, n in counts.items():
                lists[field] = lists.get(field, 0) + n
        table = pa.concat_tables(parts, promote_options="default").drop_columns(["row"])
        where = Locator(raw_files(folder, split)[0], header=False)
        if split == "test":
            tables["test"], sources["test"] = table, [(where, table.num_rows)]
            continue
        held = np.random.default_rng([seed, 8]).random(table.num_rows) < valid_frac
        tables["train"], tables["val"] = table.filter(pa.array(~held)), table.filter(pa.array(held))
        sources["train"], sources["val"] = [(where, int((~held).sum()))], [(where, int(held.sum()))]
    note = (
        f"Ali-CCP raw release: test = sample_skeleton_test, validation = {valid_frac:.0%} of the training "
        f"impressions (seeded); list-field entries read as bags: {lists or 'none'}"
    )
    from csmf.data.aliccp_raw import CONTEXT_FIELDS, ITEM_FIELDS, USER_FIELDS, list_sides

    combined = set().union(*(t.column_names for t in tables.values()))
    user_lists, item_lists = list_sides(combined)
    context = resolve(context_features, CONTEXT_FIELDS, combined)
    return cascade_from_files("aliccp", tables, sources, STAGES, note, USER_FIELDS[1:] + user_lists,
                              ITEM_FIELDS[1:] + item_lists, context)  # fmt: skip


def aliccp_raw_source(folder: str | Path, valid_frac: float = 0.1, seed: int = 0,
                      context_features: tuple[str, ...] | None = None):  # fmt: skip
    """The raw release as a cache source (csmf.data.cache): the same rows, split and features as
    `load_aliccp_raw`, block by block, so a 42M-row release converts in bounded memory."""
    from csmf.data.aliccp_raw import CONTEXT_FIELDS, ITEM_FIELDS, USER_FIELDS
    from csmf.data.sources import SPLIT_CODES, Source

    folder = Path(folder)

    def blocks():
        for split in ("train", "test"):
            rng = np.random.default_rng([seed, 8])  # one stream over the file, as load_aliccp_raw draws it
            for block, _lists in read_raw(folder, split):
                n = block.num_rows
                if split == "train":
                    code = np.where(rng.random(n) < valid_frac, SPLIT_CODES["val"], SPLIT_CODES["train"])
                else:
                    code = np.full(n, SPLIT_CODES["test"])
                yield block.drop_columns(["row"]).append_column("split", pa.array(code.astype(np.int8)))

    files = [p for split in ("train", "test") for p in raw_files(folder, split)]
    return Source(
        name="aliccp", files=files, options={"layout": "aliccp-raw", "valid_frac": valid_frac, "seed": seed},
        stages=STAGES, blocks=blocks, user_features=USER_FIELDS[1:], item_features=ITEM_FIELDS[1:],
        context=wanted(context_features, CONTEXT_FIELDS),
        context_required=context_features is not None,
        notes=[f"Ali-CCP raw release: test = sample_skeleton_test, validation = {valid_frac:.0%} of the training "
               f"impressions (seeded); scenario {CONTEXT_FIELDS} is per impression"],
    )  # fmt: skip


def aliccp_source(folder: str | Path, valid_frac: float = 0.1, seed: int = 0,
                  context_features: tuple[str, ...] | None = None):  # fmt: skip
    """Ali-CCP as a cache source: the raw release when it is there, else the processed CSVs read in blocks
    (the same rows, split and checks as `load_aliccp`)."""
    from csmf.data.aliccp_raw import CONTEXT_FIELDS
    from csmf.data.sources import SPLIT_CODES, Source, file_blocks, no_empty

    folder = Path(folder)
    if has_raw_layout(folder):
        return aliccp_raw_source(folder, valid_frac, seed, context_features)
    files = aliccp_files(folder)

    def blocks():
        for split, path in files.items():
            for where, table in file_blocks(path):
                out = _rows(table, path, where)
                no_empty(table, where, (USER_FIELD, ITEM_FIELD))
                yield pa.table({"split": pa.array(np.full(table.num_rows, SPLIT_CODES[split], dtype=np.int8)), **out})

    return Source(
        name="aliccp", files=list(files.values()), options={"layout": "aliccp"}, stages=STAGES, blocks=blocks,
        context=wanted(context_features, CONTEXT_FIELDS),
        context_required=context_features is not None,
        notes=["Ali-CCP: the release's train / val / test files are the split; exposure = every row"],
    )  # fmt: skip
