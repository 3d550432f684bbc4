"""AliExpress (Li et al., 2020; Tianchi dataset 74690, the multi-scenario search log MTReclib uses) as its
owners distribute it, mapped onto the cascade.

Files read from a folder: `train.csv` and `test.csv` (one country's folder of the release, e.g.
AliExpress_NL/), `aliexpress_{train,test}.csv`, or the `_sample` names of the fixtures in
../shared/data/aliexpress-sample. Columns: `search_id`, `categorical_1..16`, `numerical_1..63`, `click`,
`conversion`. Stages: exposure = every row, click = `click`, conversion = `conversion`.

The log has no user or item id. Retrieval needs both, so:
- the *user* is the search request (`search_id`): the query tower reads the columns that are constant
  within every search (inferred over all files: the query / user features);
- the *item* is the tuple of the remaining categorical columns (the product-side categories), written
  out as text (`"3|0|17|..."`), so two rows show the same item exactly when every item-side category
  agrees: exact, never a hash collision. Numerical columns that vary within a search are per-impression
  statistics, not identity, and are left out of the key (the load report names them). With anonymised
  features this is the finest identity the data allows; items that share every category merge.
`data.user_features` (the query-side columns) overrides the inference when it is not empty.

Split: test = the release's test file; validation = a seeded `data.valid_frac` of the training searches
(whole searches, as new to the model as the test ones); train = the other training searches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from csmf.data.errors import DataError
from csmf.data.filesplit import cascade_from_files, holdout_by_key
from csmf.data.logtable import Locator, check_stage, read_table
from csmf.data.schema import CascadeData

STAGES = ("exposure", "click", "conversion")
SEARCH = "search_id"


def aliexpress_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; give the folder holding the AliExpress csv files")
    files = {}
    for split in ("train", "test"):
        names = (f"{split}.csv", f"aliexpress_{split}.csv", f"aliexpress_{split}_sample.csv")
        found = [folder / n for n in names if (folder / n).exists()]
        if not found:
            raise DataError(f"{folder}: no AliExpress {split} file; expected one of {list(names)}")
        files[split] = found[0]
    return files


def _query_columns(table: pa.Table, candidates: list[str]) -> list[str]:
    """The columns constant within every search: the query (user) side."""
    codes = pc.dictionary_encode(table.column(SEARCH)).combine_chunks().indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    starts = np.flatnonzero(np.r_[True, codes[order][1:] != codes[order][:-1]])
    out = []
    for col in candidates:
        values = pc.dictionary_encode(table.column(col).cast(pa.string())).combine_chunks().indices
        v = values.to_numpy(zero_copy_only=False)[order]
        if np.array_equal(np.minimum.reduceat(v, starts), np.maximum.reduceat(v, starts)):
            out.append(col)
    return out


def _checked(table: pa.Table, path: Path, where) -> list[str]:
    """The feature columns of a block, after the checks that name the file and line."""
    missing = [c for c in (SEARCH, "click", "conversion") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {table.column_names}")
    if table.column(SEARCH).null_count:
        row = int(np.flatnonzero(np.asarray(pc.is_null(table.column(SEARCH))))[0])
        raise DataError(f"{where(row)}: column {SEARCH!r} is empty; every row belongs to a search")
    features = [c for c in table.column_names if c.startswith(("categorical_", "numerical_"))]
    if not any(c.startswith("categorical_") for c in features):
        raise DataError(f"{path}: no categorical_* columns; the item is identified by them")
    for col in features:
        if table.column(col).null_count:
            row = int(np.flatnonzero(np.asarray(pc.is_null(table.column(col))))[0])
            raise DataError(f"{where(row)}: column {col!r} is empty")
        kind = table.column(col).type
        if col.startswith("numerical_") and not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
            raise DataError(f"{path}: column {col!r} has type {kind}; numerical_* hold numbers")
    return features


def _rows(table: pa.Table, where, query: list[str], key_columns: list[str]) -> dict[str, pa.Array]:
    """A block as the cascade's columns: user = search, item = the item-side category tuple."""
    click, conversion = check_stage(table, "click", where), check_stage(table, "conversion", where)
    if (conversion & ~click).any():
        row = int(np.flatnonzero(conversion & ~click)[0])
        raise DataError(f"{where(row)}: conversion 1 without a click; AliExpress conversions follow clicks")
    key = pc.binary_join_element_wise(*(table.column(c).cast(pa.string()) for c in key_columns), "|")
    out = {"user_id": table.column(SEARCH).cast(pa.string()), "item_id": key,
           "exposure": pa.array(np.ones(table.num_rows, dtype=np.int8)),
           "click": pa.array(click.astype(np.int8)),
           "conversion": pa.array(conversion.astype(np.int8))}  # fmt: skip
    out |= {c: table.column(c) for c in query}
    out |= {f"item:{c}": table.column(c) for c in key_columns}  # named apart: they also form the item key
    return out


def load_aliexpress(
    folder: str | Path, valid_frac: float = 0.1, seed: int = 0, query_columns: tuple[str, ...] | None = None
) -> CascadeData:
    folder = Path(folder)
    files = aliexpress_files(folder)
    raw = {}
    for split, path in files.items():
        table = read_table(path)
        raw[split] = (path, table, _checked(table, path, Locator(path)))
    # the query side over every file: a column must be constant within each search everywhere
    both = pa.concat_tables([t.select([SEARCH, *f]) for _, t, f in raw.values()], promote_options="default")
    shared = [c for c in raw["train"][2] if c in raw["test"][2]]
    if query_columns:
        unknown = [c for c in query_columns if c not in shared]
        if unknown:
            raise DataError(f"data.user_features: {unknown} are not AliExpress columns; columns are {shared}")
        query = list(query_columns)
    else:
        query = _query_columns(both, shared)
    key_columns = [c for c in shared if c.startswith("categorical_") and c not in query]
    if not key_columns:
        raise DataError(f"{folder}: every categorical column is constant within a search; nothing identifies items")
    per_impression = [c for c in shared if c not in query and c not in key_columns]

    tables, sources = {}, {}
    for split, (path, table, _) in raw.items():
        out = _rows(table, Locator(path), query, key_columns)
        normalised = pa.table(out)
        if split == "test":
            tables["test"], sources["test"] = normalised, [(path, table.num_rows)]
            continue
        held = holdout_by_key(table.column(SEARCH), valid_frac, seed)
        # keep file order inside each part, and remember which file rows each part holds for errors
        tables["train"] = normalised.filter(pa.array(~held))
        tables["val"] = normalised.filter(pa.array(held))
        sources["train"], sources["val"] = [(path, int((~held).sum()))], [(path, int(held.sum()))]
    note = (
        f"AliExpress: user = search_id (query features {query or 'none'}); item = the tuple of {key_columns}; "
        f"per-impression columns not used: {per_impression or 'none'}; test = the release's test file, "
        f"validation = {valid_frac:.0%} of the training searches"
    )
    data = cascade_from_files(
        "aliexpress", tables, sources, STAGES, note,
        user_features=tuple(query), item_features=tuple(f"item:{c}" for c in key_columns),
    )  # fmt: skip
    return data


def aliexpress_source(folder: str | Path, valid_frac: float, seed: int, query_columns: tuple[str, ...] | None):
    """AliExpress as a cache source, read in blocks. The query columns are `data.user_features` or, when that
    is empty, inferred from the training file's first block (a search's rows are contiguous in the release);
    a query column that turns out to vary within a search over all the rows is kept per row and named in the
    manifest's notes, and the item key (the other categorical columns) is not changed by it;
    validation = the training searches whose seeded hash falls below `valid_frac`."""
    from csmf.data.sources import SPLIT_CODES, Source, file_blocks, pair_split

    folder = Path(folder)
    files = aliexpress_files(folder)
    chosen: dict[str, list[str]] = {}

    def sides(table: pa.Table, features: list[str]) -> tuple[list[str], list[str]]:
        if "query" not in chosen:
            query = list(query_columns) if query_columns else _query_columns(table, features)
            chosen["query"] = query
            chosen["key"] = [c for c in features if c.startswith("categorical_") and c not in query]
            if not chosen["key"]:
                raise DataError(f"{folder}: every categorical column is constant within a search; nothing "
                                "identifies items")  # fmt: skip
        return chosen["query"], chosen["key"]

    def blocks():
        for split, path in files.items():
            for where, table in file_blocks(path):
                query, key_columns = sides(table, _checked(table, path, where))
                out = _rows(table, where, query, key_columns)
                if split == "test":
                    code = np.full(table.num_rows, SPLIT_CODES["test"], dtype=np.int8)
                else:  # whole searches: the hash of the search alone (an empty item for every row)
                    nothing = pa.array(np.full(table.num_rows, "", dtype=object), type=pa.string())
                    code = pair_split(out["user_id"], nothing, 0.0, valid_frac, seed)
                yield pa.table({"split": pa.array(code), **out})

    query = tuple(query_columns) if query_columns else None
    note = (
        "AliExpress: user = search_id, item = the tuple of the item-side categorical columns; test = the release's "
        f"test file, validation = {valid_frac:.0%} of the training searches (by a seeded hash)"
    )
    return Source(
        name="aliexpress",
        files=list(files.values()),
        options={"layout": "aliexpress", "valid_frac": valid_frac, "seed": seed, "query": query},
        stages=STAGES,
        blocks=blocks,
        notes=[note],
    )  # fmt: skip (the cache infers each side)
