"""Ali-CCP (Ma et al., SIGIR 2018; Tianchi dataset 408) in its raw release layout, read in blocks.

Files: `sample_skeleton_{train,test}.csv` (one impression per line) and `common_features_{train,test}.csv`
(the features shared by the impressions of one request, keyed by an md5). Neither has a header. As the
dataset's documentation describes them, and as the public preprocessing scripts (ESMM's release notes,
PaddleRec's and torch-rechub's `preprocess_ali_ccp`) read them:

    sample_skeleton: sample_id, click, conversion, common_feature_index, feature_num, feature_list
    common_features: common_feature_index, feature_num, feature_list

`feature_list` holds `feature_num` entries separated by \\x01; each entry is `field_id \\x02 feature_id
\\x03 value`. Field 101 is the user id and 205 the item id; 121..129 are user profile fields, 206, 207 and
216 the item's category, shop and brand, 301 the scenario (per impression). A field with several entries
(the behaviour fields 109_14, 110_14, 127_14, 150_14 and 210) is a list: it is read as a list column and
becomes a bag feature (the user's behaviour lists over all its requests; 210 on the item side). Every malformed entry,
a wrong `feature_num`, a 0/1 label that is neither, and a request key missing from common_features is an
error naming the file, the line and the field.

Normalised rows: `user_id` (101), `item_id` (205), `exposure` (every row), `click`, `purchase`
(`conversion`, which Ali-CCP only records after a click), the scalar fields by their id, `row` (the line).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from csmf.data.errors import DataError

SKELETON = ("sample_id", "click", "conversion", "common_feature_index", "feature_num", "feature_list")
COMMON = ("common_feature_index", "feature_num", "feature_list")
USER_FIELDS = ("101", "121", "122", "124", "125", "126", "127", "128", "129")
ITEM_FIELDS = ("205", "206", "207", "216")
CONTEXT_FIELDS = ("301",)
LIST_FIELDS = ("109_14", "110_14", "127_14", "150_14", "210")
ITEM_LIST_FIELDS = ("210",)  # the impression's own list field; the others come with the request (user side)
ENTRY = r"^(?P<field>[0-9_]+)\x02(?P<feature>[^\x01\x02\x03]+)\x03(?P<value>[^\x01\x02\x03]*)$"
BLOCK_BYTES = 32 << 20  # a block's parsed entries take several times its size: this bounds peak memory


def raw_files(folder: Path, split: str) -> tuple[Path, Path]:
    skeleton, common = folder / f"sample_skeleton_{split}.csv", folder / f"common_features_{split}.csv"
    for path in (skeleton, common):
        if not path.exists():
            raise DataError(f"{path}: file not found; the raw Ali-CCP release has sample_skeleton_{{train,test}}.csv "
                            "and common_features_{train,test}.csv side by side")  # fmt: skip
    return skeleton, common


def list_sides(columns: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(user-side, item-side) list fields among `columns`."""
    present = [f for f in LIST_FIELDS if f in columns]
    return tuple(f for f in present if f not in ITEM_LIST_FIELDS), tuple(f for f in present if f in ITEM_LIST_FIELDS)


def has_raw_layout(folder: Path) -> bool:
    return (folder / "sample_skeleton_train.csv").exists()


def _blocks(path: Path, names: tuple[str, ...], block_bytes: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(line of the block's first row, block) in file order; every column read as text."""
    read = pacsv.ReadOptions(column_names=list(names), block_size=block_bytes, use_threads=True)
    parse = pacsv.ParseOptions(quote_char=False)  # the lists never hold commas or quotes
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
    line = 1
    try:
        reader = pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            yield line, batch
            line += batch.num_rows
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: cannot parse near line {line}: {err}; each line has {len(names)} "
                        f"comma-separated fields: {', '.join(names)}") from None  # fmt: skip


def parse_features(
    batch: pa.RecordBatch, path: Path, first_line: int, fields: tuple[str, ...]
) -> tuple[dict[str, pa.Array], dict[str, int]]:
    """The first feature id of each of `fields` per row (null where absent), each list field present as a list
    column (every entry of the field, per row), and the entry count of each list field."""
    text = batch.column("feature_list")
    entries = pc.split_pattern(text, "\x01")
    flat, parent = pc.list_flatten(entries), pc.list_parent_indices(entries).to_numpy()
    counts = pc.list_value_length(entries).to_numpy(zero_copy_only=False)
    try:
        declared = np.asarray(pc.cast(batch.column("feature_num"), pa.int64()))
    except pa.ArrowInvalid:
        bad = ~np.char.isdigit(np.asarray(batch.column("feature_num").to_numpy(zero_copy_only=False), dtype=str))
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}:{first_line + row}: feature_num {batch.column('feature_num')[row].as_py()!r} "
                        "is not a count") from None  # fmt: skip
    if not np.array_equal(declared, counts):
        row = int(np.flatnonzero(declared != counts)[0])
        raise DataError(f"{path}:{first_line + row}: feature_num says {declared[row]} entries, feature_list has "
                        f"{counts[row]} (entries are separated by \\x01)")  # fmt: skip
    parts = pc.extract_regex(flat, ENTRY) if len(flat) else None
    if parts is not None and parts.null_count:
        k = int(np.flatnonzero(np.asarray(pc.is_null(parts)))[0])
        row = int(parent[k])
        position = k - int(np.searchsorted(parent, row))
        raise DataError(f"{path}:{first_line + row}: feature_list entry {position + 1} {flat[k].as_py()!r} is not "
                        "field\\x02feature\\x03value")  # fmt: skip
    out: dict[str, pa.Array] = {}
    lists: dict[str, int] = {}
    if parts is None:
        return {f: pa.nulls(batch.num_rows, pa.string()) for f in fields}, lists
    # everything stays in Arrow: no Python string per entry (a 64 MB block holds millions of entries)
    field, feature = parts.field("field"), parts.field("feature")
    for f in fields:
        hit = np.flatnonzero(np.asarray(pc.equal(field, f)))
        rows, first = np.unique(parent[hit], return_index=True)
        at = np.zeros(batch.num_rows, dtype=np.int64)
        at[rows] = hit[first]
        missing = np.ones(batch.num_rows, dtype=bool)
        missing[rows] = False
        out[f] = pc.take(feature, pa.array(at, mask=missing))  # null where the row has no such entry
    for f in LIST_FIELDS:
        hit = np.flatnonzero(np.asarray(pc.equal(field, f)))
        if len(hit):  # every entry of the field, per row: a list feature (a bag)
            offsets = np.searchsorted(parent[hit], np.arange(batch.num_rows + 1)).astype(np.int32)
            out[f] = pa.ListArray.from_arrays(pa.array(offsets), pc.take(feature, pa.array(hit)))
            lists[f] = len(hit)
    return out, lists


def read_common(path: Path, block_bytes: int = BLOCK_BYTES) -> pa.Table:
    """The per-request features, one row per md5 key; a repeated key is an error naming its line."""
    parts = []
    for line, batch in _blocks(path, COMMON, block_bytes):
        values, _ = parse_features(batch, path, line, USER_FIELDS)
        parts.append(pa.table({"key": batch.column("common_feature_index"), **values}))
    table = pa.concat_tables(parts, promote_options="default")  # a list field may be absent from a block
    keys = table.column("key")
    if pc.count_distinct(keys).as_py() != len(keys):
        counts = pc.value_counts(keys)
        repeated = counts.field("values")[int(np.argmax(counts.field("counts").to_numpy()))].as_py()
        line = int(np.flatnonzero(np.asarray(pc.equal(keys, repeated)))[1]) + 1
        raise DataError(f"{path}:{line}: request key {repeated!r} repeats; common_features has one line per key")
    return table


def read_raw(folder: Path, split: str, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[pa.Table, dict[str, int]]]:
    """Normalised rows of `split`, block by block, and the list-field entry counts of each block."""
    skeleton, common_path = raw_files(folder, split)
    common = read_common(common_path, block_bytes)
    keys = common.column("key")
    for line, batch in _blocks(skeleton, SKELETON, block_bytes):
        labels = {}
        for name in ("click", "conversion"):
            col = batch.column(name)
            ok = np.asarray(pc.fill_null(pc.is_in(col, pa.array(["0", "1"])), False))
            if not ok.all():
                row = int(np.flatnonzero(~ok)[0])
                raise DataError(f"{skeleton}:{line + row}: {name} is {col[row].as_py()!r}; it holds 0 or 1")
            labels[name] = np.asarray(pc.equal(col, "1"))
        if (labels["conversion"] & ~labels["click"]).any():
            row = int(np.flatnonzero(labels["conversion"] & ~labels["click"])[0])
            raise DataError(f"{skeleton}:{line + row}: conversion 1 without a click; Ali-CCP conversions follow clicks")
        own, lists = parse_features(batch, skeleton, line, ITEM_FIELDS + CONTEXT_FIELDS)
        at = pc.index_in(batch.column("common_feature_index"), value_set=keys)
        if at.null_count:
            row = int(np.flatnonzero(np.asarray(pc.is_null(at)))[0])
            key = batch.column("common_feature_index")[row].as_py()
            raise DataError(f"{skeleton}:{line + row}: request key {key!r} is not in {common_path}")
        shared = common.take(at)
        if pc.any(pc.is_null(own["205"])).as_py():
            row = int(np.flatnonzero(np.asarray(pc.is_null(own["205"])))[0])
            raise DataError(f"{skeleton}:{line + row}: no item id (field 205) in feature_list")
        if pc.any(pc.is_null(shared.column("101"))).as_py():
            row = int(np.flatnonzero(np.asarray(pc.is_null(shared.column("101"))))[0])
            raise DataError(f"{skeleton}:{line + row}: its request has no user id (field 101) in {common_path}")
        n = batch.num_rows
        table = {"user_id": shared.column("101"), "item_id": own["205"],
                 "exposure": pa.array(np.ones(n, dtype=np.int8)),
                 "click": pa.array(labels["click"].astype(np.int8)),
                 "purchase": pa.array(labels["conversion"].astype(np.int8))}  # fmt: skip
        table |= {f: shared.column(f) for f in USER_FIELDS[1:]}
        table |= {f: own[f] for f in ITEM_FIELDS[1:] + CONTEXT_FIELDS}
        # list fields: the request's behaviour lists (user side) and the impression's own (item side)
        table |= {f: shared.column(f) for f in LIST_FIELDS if f in shared.column_names}
        table |= {f: own[f] for f in LIST_FIELDS if f in own and f not in table}
        table["row"] = pa.array(np.arange(line, line + n, dtype=np.int64))
        yield pa.table(table), lists
