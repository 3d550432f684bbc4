"""Loader for a generic log table (CSV or Parquet): how users bring their own data.

One row per logged (user, item) pair, one 0/1 column per stage in cascade order, optional
`timestamp` and feature columns. Ids may be any strings or integers; they are mapped to contiguous
indices (first-appearance order) and the maps are kept for serving. Every error names the file, the
line (CSV) or row (Parquet), the column and what is wrong.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

import csmf.data.context as context
from csmf.data.errors import DataError
from csmf.data.schema import CascadeLog, LoadReport
from csmf.fusion import clip


def read_table(path: Path, text_columns: tuple[str, ...] = ()) -> pa.Table:
    """A CSV, TSV or Parquet file as a table; `text_columns` of a CSV are read as text, not typed by inference
    (the id columns: _ids_from_text decides their type from every value)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    suffix = "".join(path.suffixes[-2:]) if path.suffix in (".gz", ".bz2", ".zst") else path.suffix
    try:
        if suffix.startswith(".parquet") or suffix == ".pq":
            unique_columns(pq.read_schema(path).names, path, "schema")  # the reader fails on a repeated name
            return pq.read_table(path)
        if suffix.startswith(".csv") or suffix.startswith(".tsv"):
            if suffix in (".csv", ".tsv"):
                refuse_compressed(path)
            table = _read_csv(path, "\t" if suffix.startswith(".tsv") else ",", text_columns)
            unique_columns(table.column_names, path)
            return table
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot parse: {err}") from None
    raise DataError(f"{path}: unknown log format {suffix!r}; use .csv, .tsv or .parquet (optionally .gz)")


# the first bytes of the compressed formats the CSV reader opens by their suffix
COMPRESSED = {b"\x1f\x8b": ("gzip", ".gz"), b"BZh": ("bzip2", ".bz2"), b"\x28\xb5\x2f\xfd": ("zstd", ".zst")}


def refuse_compressed(path: Path) -> None:
    """A compressed file named plain .csv: the reader would see binary rows (and pyarrow prints a decode
    traceback on the way), so say what the file is and the name it needs."""
    with open(path, "rb") as f:
        head = f.read(4)
    for magic, (kind, suffix) in COMPRESSED.items():
        if head.startswith(magic):
            raise DataError(f"{path}: the file is {kind}-compressed but named {path.suffix}; rename it to "
                            f"{path.name}{suffix} (the suffix tells csmf to decompress it)")  # fmt: skip


def unique_columns(names: list[str], path: Path, part: str = "header") -> None:
    """Every column name once: a repeated one is ambiguous (which `click` is the stage?)."""
    positions: dict[str, list[int]] = {}
    for n, name in enumerate(names, start=1):
        positions.setdefault(name, []).append(n)
    repeated = {name: at for name, at in positions.items() if len(at) > 1}
    if repeated:
        name, at = next(iter(repeated.items()))
        raise DataError(
            f"{path}: column name {name!r} appears {len(at)} times in the {part} (columns "
            f"{', '.join(map(str, at[:-1]))} and {at[-1]}); rename them so every column name is unique"
            + (f" (also repeated: {list(repeated)[1:]})" if len(repeated) > 1 else "")
        )


def _read_csv(path: Path, delimiter: str, text_columns: tuple[str, ...] = ()) -> pa.Table:
    # Empty cells are nulls in every column, so an empty id is reported rather than read as "".
    convert = pacsv.ConvertOptions(strings_can_be_null=True, column_types=dict.fromkeys(text_columns, pa.string()))
    try:
        return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter), convert_options=convert)
    except pa.ArrowInvalid:
        bad = _first_bad_row(path, delimiter)
        if bad is None:
            raise
        raise DataError(bad) from None


def _first_bad_row(path: Path, delimiter: str) -> str | None:
    """The parse error with its line: the threaded reader does not know line numbers, so on an error the
    file is read again on one thread, which does (only on this path: it is slower)."""
    found = []

    def record(row) -> str:
        found.append(row)
        return "error"

    parse = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=record)
    undecodable: list[BaseException] = []
    # pyarrow decodes a bad row as UTF-8 before calling `record` and prints a failed decode as "Exception
    # ignored"; catch it here so the user gets one message, not a traceback before it
    hook, sys.unraisablehook = sys.unraisablehook, lambda info: undecodable.append(info.exc_value)
    try:
        pacsv.read_csv(path, read_options=pacsv.ReadOptions(use_threads=False), parse_options=parse)
    except pa.ArrowInvalid:
        pass
    finally:
        sys.unraisablehook = hook
    if not found and any(isinstance(e, UnicodeDecodeError) for e in undecodable):
        return f"{path}: not UTF-8 text (a malformed row holds bytes that are not UTF-8); save the log as UTF-8 CSV"
    if not found:
        return None
    row = found[0]
    line = f"{path}:{row.number}" if row.number is not None else str(path)
    text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
    hint = (
        "; a quote that is never closed joins the lines after it into one cell"
        if '"' in row.text and row.text.count('"') % 2
        else ""
    )
    return (
        f"{line}: expected {row.expected_columns} columns (as in the header), got {row.actual_columns}: {text!r}{hint}"
    )


class Locator:
    """Turns a 0-based data-row index into the words a user can look up: CSV line or Parquet row."""

    def __init__(self, path: Path, header: bool = True):
        self.path = path
        self.csv = ".csv" in path.suffixes or ".tsv" in path.suffixes
        self.header = header  # raw releases (Ali-CCP's) have none: data row r is then line r + 1

    def __call__(self, row: int) -> str:
        return f"{self.path}:{self._csv_line(row)}" if self.csv else f"{self.path} row {row + 1}"

    def _csv_line(self, row: int) -> int:
        """Physical line of data row `row`: the reader skips blank lines, so count them (only on error)."""
        opener = pa.input_stream(str(self.path), compression="detect")
        non_blank = 0  # the header is non-blank line 1, data row r is non-blank line r + 2
        target = row + 2 if self.header else row + 1
        with opener as stream:
            for lineno, raw in enumerate(stream.read().decode(errors="replace").splitlines(), start=1):
                if raw.strip():
                    non_blank += 1
                    if non_blank == target:
                        return lineno
        return target


# a float64 holds every integer up to 2^53 exactly; a larger id read as a number may merge with its neighbour
MAX_EXACT_ID = 2**53

# a column right after the stages in which more than this share of the cells is 0 or 1 is taken for a
# damaged stage column (an error naming the first bad cell), not the first feature: a wrong guess must
# be an error the user can answer with --stages, never a stage silently dropped
DAMAGED_STAGE_SHARE = 0.5
STAGE_TEXT = ("0", "1", "0.0", "1.0", "true", "false")


class Concatenated:
    """The locator of a table concatenated from several files: row r -> the file and line it came from."""

    def __init__(self, parts: list[tuple[Path | Locator, int]]):
        self.parts = [(p if isinstance(p, Locator) else Locator(p), rows) for p, rows in parts]
        paths = list(dict.fromkeys(str(locate.path) for locate, _ in self.parts))
        self.path = ", ".join(paths)

    def __call__(self, row: int) -> str:
        for locate, rows in self.parts:
            if row < rows:
                return locate(row)
            row -= rows
        raise IndexError(row)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


# an integer written one way only: no sign but a minus, no leading zero, no spaces ("-0" would merge with "0")
PLAIN_INTEGER = r"^(0|-?[1-9][0-9]*)$"


def _ids_from_text(arr: pa.ChunkedArray, col: str) -> tuple[pa.ChunkedArray, str]:
    """An id column read as text (CSV) -> integers when every value is a plain integer, else the text itself.
    One rule for the whole column, so no row changes another row's identity: "007", "0007" and "7" are
    three ids whether or not the column holds a non-numeric id elsewhere."""
    plain = np.asarray(pc.fill_null(pc.match_substring_regex(arr, PLAIN_INTEGER), True))  # nulls: checked later
    if not plain.all():
        row = _first(~plain)
        value = clip(repr(arr[row].as_py()), 40)
        return arr, (
            f"{col!r} read as text: data row {row + 1:,} holds {value}, not a plain integer, so every {col} is "
            "kept as written ('007' and '7' are two ids)"
        )
    try:
        return pc.cast(arr, pa.int64()), f"{col!r} read as integers (every value a plain integer)"
    except pa.ArrowInvalid:  # past the 64-bit range: the text keeps every id exact
        return arr, f"{col!r} read as text: some ids are past the 64-bit integer range"


def _encode_ids(
    table: pa.Table, col: str, where: Locator, from_text: bool = False
) -> tuple[np.ndarray, np.ndarray, str]:
    """Column of ids -> (int32 index per row, original id per index, what was done for the load report).
    `from_text`: the column was read as text (a CSV's), so its type is decided here from every value."""
    arr = table.column(col)
    if arr.null_count:
        row = _first(np.asarray(pc.is_null(arr)))
        raise DataError(f"{where(row)}: column {col!r} is empty; every row needs a {col}")
    if from_text and (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr, note = _ids_from_text(arr, col)
    else:
        kind = "text" if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) else "integers"
        note = f"{col!r} read as {kind} (a {arr.type} column)"
    if pa.types.is_floating(arr.type):
        values = arr.to_numpy()
        huge = ~(np.abs(values) <= MAX_EXACT_ID)  # also catches inf and nan
        if huge.any():
            row = _first(huge)
            raise DataError(
                f"{where(row)}: column {col!r} has id {values[row].item()!r}, too large to be read exactly as a "
                f"number (at most {MAX_EXACT_ID:,}); quote the ids or store them as strings"
            )
        bad = values != np.floor(values)
        if bad.any():
            row = _first(bad)
            raise DataError(
                f"{where(row)}: column {col!r} has non-integer id {values[row].item()!r}; "
                "ids must be integers or strings"
            )
        arr = pc.cast(arr, pa.int64())
    if pa.types.is_integer(arr.type):
        values = arr.to_numpy()
        if (values < 0).any():
            row = _first(values < 0)
            raise DataError(
                f"{where(row)}: column {col!r} has negative id {values[row].item()}; integer ids must be >= 0"
            )
    elif not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise DataError(f"{where.path}: column {col!r} has type {arr.type}; ids must be integers or strings")
    encoded = pc.dictionary_encode(arr).combine_chunks()
    return encoded.indices.to_numpy().astype(np.int32), encoded.dictionary.to_numpy(zero_copy_only=False), note


def _stage_values(table: pa.Table, col: str) -> np.ndarray | None:
    """0/1 column -> bool array; None when the column is not 0/1 (for stage inference)."""
    arr = table.column(col)
    if arr.null_count:
        return None
    if pa.types.is_boolean(arr.type):
        return arr.to_numpy(zero_copy_only=False).astype(bool)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):  # "1", "TRUE", "0.0" mixed
        text = np.char.lower(arr.to_numpy(zero_copy_only=False).astype(str))
        if not np.isin(text, STAGE_TEXT).all():
            return None
        return np.isin(text, ("1", "1.0", "true"))
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        return None
    values = arr.to_numpy()
    if not np.isin(values, (0, 1)).all():
        return None
    return values.astype(bool)


def _stage_share(arr: pa.ChunkedArray) -> float:
    """Share of the cells of a column that read as 0 or 1 (an empty cell does not)."""
    if pa.types.is_boolean(arr.type):
        return 1.0 - arr.null_count / max(len(arr), 1)
    if _is_list(arr):
        return 0.0
    text = pc.utf8_lower(pc.cast(arr, pa.string()))
    return float(np.asarray(pc.fill_null(pc.is_in(text, pa.array(STAGE_TEXT)), False)).mean()) if len(arr) else 0.0


def _fractional_binary(arr: pa.ChunkedArray) -> bool:
    """A float column whose values all lie in [0, 2) with some not whole above 1 (0.5 / 1.5): a stage column that a
    conversion damaged rather than a feature, whatever its share of clean cells (so it cannot end the stages
    unseen: --stages names them when it really is a feature). A share or rate in [0, 1] (a click rate) is a
    feature: it ends the stages as before."""
    if not pa.types.is_floating(arr.type) or arr.null_count or not len(arr):
        return False
    values = arr.to_numpy()
    return bool(((values >= 0) & (values < 2)).all() and ((values > 1) & (values != np.floor(values))).any())


def check_stage(table: pa.Table, col: str, where: Locator) -> np.ndarray:
    values = _stage_values(table, col)
    if values is not None:
        return values
    arr = table.column(col)
    if _is_list(arr):
        raise DataError(f"{where.path}: stage column {col!r} holds lists; stage columns hold 0 or 1")
    if arr.null_count:
        row = _first(np.asarray(pc.is_null(arr)))
        raise DataError(f"{where(row)}: stage column {col!r} is empty; stage columns hold 0 or 1")
    raw = arr.to_numpy(zero_copy_only=False)
    bad = ~np.isin(np.char.lower(raw.astype(str)), STAGE_TEXT)
    row = _first(bad) if bad.any() else 0
    value = raw[row].item() if isinstance(raw[row], np.generic) else raw[row]
    raise DataError(f"{where(row)}: stage column {col!r} has value {value!r}; stage columns hold 0 or 1")


def _infer_stages(
    table: pa.Table, item_col: str, stops: tuple[str, ...], where: Locator
) -> tuple[dict[str, np.ndarray], str]:
    """The run of 0/1 columns right after the item column, and what ended it (for the load report)."""
    columns = table.column_names
    labels: dict[str, np.ndarray] = {}
    ended_by = "up to the last column"
    for col in columns[columns.index(item_col) + 1 :]:
        if col in stops:
            ended_by = f"ended by {col!r}"
            break
        values = _stage_values(table, col)
        if values is None:
            share, fractional = _stage_share(table.column(col)), _fractional_binary(table.column(col))
            if not labels or share > DAMAGED_STAGE_SHARE or fractional:
                why = "all its values lie in [0, 2) and some above 1 are not whole" if fractional else (
                    f"{share:.0%} of its cells are 0 or 1")  # fmt: skip
                try:
                    check_stage(table, col, where)  # raises naming the row with the first non-0/1 value
                except DataError as err:
                    raise DataError(
                        f"{err}. Column {col!r} is taken for a stage column (it follows {item_col!r}"
                        + (f" and the stage column(s) {list(labels)}" if labels else "")
                        + f" and {why}): fix the value, or name the stage columns with --stages if it is a feature"
                    ) from None
            ended_by = f"ended by {col!r}, which is not 0/1"
            break
        labels[col] = values
    if not labels:
        raise DataError(
            f"{where.path}: no stage columns after {item_col!r}; put the 0/1 stage columns right after the id "
            f"columns, or name them with --stages (columns are {columns})"
        )
    return labels, ended_by


def load_log(
    path: str | Path,
    stages: tuple[str, ...] = (),
    user_col: str = "user_id",
    item_col: str = "item_id",
    timestamp_col: str = "timestamp",
    user_features: tuple[str, ...] | None = None,
    item_features: tuple[str, ...] | None = None,
    context_features: tuple[str, ...] = (),
) -> CascadeLog:
    """Read a generic log into a CascadeLog.

    Stages: `stages` names and orders the stage columns; when empty, the stages are the run of 0/1
    columns right after the item column (pass `stages` if a 0/1 feature column follows them).
    Features: columns that are neither ids, stages nor the timestamp. Unless listed explicitly, a
    column constant within every user is a user feature and one constant within every item is an
    item feature; any other column is reported as unused. `context_features` are per-row context columns
    (csmf.data.context): each pair keeps its latest row's value.
    """
    path, where = Path(path), Locator(Path(path))
    # a CSV's ids are read as text and typed by one rule over the whole column (_ids_from_text), so an
    # unrelated row never changes which ids are the same
    return log_from_table(
        read_table(path, (user_col, item_col)), where, stages, user_col, item_col, timestamp_col, user_features,
        item_features, context_features, ids_from_text=where.csv,
    )  # fmt: skip


def log_from_table(
    table: pa.Table,
    where: Locator | Concatenated,
    stages: tuple[str, ...] = (),
    user_col: str = "user_id",
    item_col: str = "item_id",
    timestamp_col: str = "timestamp",
    user_features: tuple[str, ...] | None = None,
    item_features: tuple[str, ...] | None = None,
    context_features: tuple[str, ...] = (),
    ids_from_text: bool = False,
) -> CascadeLog:
    """load_log on a table already read; `where` turns a row index into the file and line it came from.
    `ids_from_text`: the id columns were read as text (a CSV's), typed here by csmf.data.logtable._ids_from_text."""
    path = where.path
    columns = table.column_names
    for col in (user_col, item_col):
        if col not in columns:
            raise DataError(f"{path}: missing id column {col!r}; columns are {columns}")
    if table.num_rows == 0:
        raise DataError(f"{path}: the log has no rows")
    report = LoadReport(str(path))
    report.rows_read = table.num_rows

    if stages:
        missing = [s for s in stages if s not in columns]
        if missing:
            raise DataError(f"{path}: missing stage column(s) {missing}; columns are {columns}")
        labels = {s: check_stage(table, s, where) for s in stages}
    else:
        labels, ended_by = _infer_stages(table, item_col, (timestamp_col, user_col), where)
        stages = tuple(labels)
        report.notes.append(
            f"stages inferred: {', '.join(map(repr, stages))} (the run of 0/1 columns right after {item_col!r}, "
            f"{ended_by}); if one of them is a feature, name the stages with --stages"
        )
    for s in stages:
        if not labels[s].any():
            raise DataError(f"{path}: stage column {s!r} has no positive (1) rows; every stage needs positives")

    users, user_ids, user_note = _encode_ids(table, user_col, where, ids_from_text)
    items, item_ids, item_note = _encode_ids(table, item_col, where, ids_from_text)
    report.notes.append(f"ids: {user_note}; {item_note}")
    n_users, n_items = len(user_ids), len(item_ids)
    label_matrix = np.stack([labels[s] for s in stages], axis=1)

    timestamps = None
    if timestamp_col in columns:
        ts = table.column(timestamp_col)
        if ts.null_count:
            row = _first(np.asarray(pc.is_null(ts)))
            raise DataError(f"{where(row)}: column {timestamp_col!r} is empty")
        if pa.types.is_timestamp(ts.type) or pa.types.is_date(ts.type):
            ts = pc.cast(pc.cast(ts, pa.timestamp("us")), pa.int64())
        if not (pa.types.is_integer(ts.type) or pa.types.is_floating(ts.type)):
            raise DataError(f"{path}: column {timestamp_col!r} has type {ts.type}; use numbers or datetimes")
        timestamps = ts.to_numpy().astype(np.float64)

    # Rows with no positive stage carry no signal for any objective: counted, then dropped.
    any_stage = label_matrix.any(axis=1)
    report.skip("rows with every stage 0 (no positive for any objective)", int((~any_stage).sum()))

    named = {user_col, item_col, timestamp_col, *stages, *(user_features or ()), *(item_features or ())}
    context.check_columns(context_features, columns, str(path), named)
    for col in context_features:
        if _is_list(table.column(col)):
            raise DataError(f"{path}: context column {col!r} holds lists; a context is one value per row")
    feature_cols = [c for c in columns if c not in (user_col, item_col, timestamp_col, *stages, *context_features)]
    ufeat, ifeat = _features(
        table, feature_cols, users, items, n_users, n_items, user_features, item_features, path, report
    )

    keep = np.flatnonzero(any_stage)
    key = users[keep].astype(np.int64) * n_items + items[keep]
    order = keep[np.argsort(key, kind="stable")]
    key_sorted = users[order].astype(np.int64) * n_items + items[order]
    starts = np.flatnonzero(np.r_[True, key_sorted[1:] != key_sorted[:-1]])
    report.duplicate_pairs = len(order) - len(starts)
    pair_labels = np.logical_or.reduceat(label_matrix[order], starts, axis=0) if len(order) else label_matrix[:0]
    pair_ts = np.maximum.reduceat(timestamps[order], starts) if timestamps is not None and len(order) else None
    pair_context = {}
    if context_features:
        # the same pairs, each pair's rows by time (ties: file order), so a pair's last row is its latest
        by_time = keep[np.lexsort((timestamps[keep], key))] if timestamps is not None else order
        for col in context_features:
            values = context.latest_per_pair(_column_codes(table.column(col)), by_time, starts)
            empty = context.latest_per_pair(np.asarray(pc.is_null(table.column(col))), by_time, starts)
            pair_context[col] = context.encode(values, unknown=empty)
        report.notes.append(
            "context columns (per row, each pair's latest value): "
            + ", ".join(f"{c!r} ({int(v.max())} values)" for c, v in pair_context.items())
        )

    return CascadeLog(
        stages=tuple(stages),
        n_users=n_users,
        n_items=n_items,
        users=users[order][starts],
        items=items[order][starts],
        labels=pair_labels,
        timestamps=pair_ts,
        user_ids=user_ids,
        item_ids=item_ids,
        user_features=ufeat,
        item_features=ifeat,
        report=report,
        context=pair_context,
    )


def _column_codes(arr: pa.ChunkedArray) -> np.ndarray:
    """Numbers stay numbers; anything else becomes category codes (nulls become their own code)."""
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type):
        if arr.null_count == 0:
            return arr.to_numpy(zero_copy_only=False).astype(np.float64)
    encoded = pc.dictionary_encode(arr.cast(pa.string())).combine_chunks()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    return np.where(np.isnan(codes.astype(float)), -1, codes).astype(np.int64) if encoded.null_count else codes


def _per_entity(codes: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray | None:
    """Value per entity when the column is constant within every entity, else None."""
    order = np.argsort(owner, kind="stable")
    sorted_owner, sorted_codes = owner[order], codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_owner[1:] != sorted_owner[:-1]])
    lo = np.minimum.reduceat(sorted_codes, starts)
    hi = np.maximum.reduceat(sorted_codes, starts)
    if not np.array_equal(lo, hi):
        return None
    out = np.zeros(n, dtype=sorted_codes.dtype)
    out[sorted_owner[starts]] = lo
    return out


MAX_BAG = 64  # a bag keeps an entity's most frequent codes, at most this many


def _is_list(arr: pa.ChunkedArray) -> bool:
    return pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)


def bag_codes(arr: pa.ChunkedArray | pa.Array, owner: np.ndarray, n: int, max_len: int = MAX_BAG) -> np.ndarray:
    """(n, L) codes (1.., 0 = padding) of the values in each entity's lists, over all its rows: the
    entity's bag, most frequent values first, at most `max_len` of them."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    flat, parent = pc.list_flatten(arr), pc.list_parent_indices(arr).to_numpy()
    keep = ~np.asarray(pc.is_null(flat)) if flat.null_count else np.ones(len(flat), dtype=bool)
    encoded = pc.dictionary_encode(flat.cast(pa.string()))
    codes = encoded.indices.to_numpy(zero_copy_only=False)[keep].astype(np.int64) + 1
    entity = owner[parent[keep]].astype(np.int64)
    width = len(encoded.dictionary) + 1
    key, counts = np.unique(entity * width + codes, return_counts=True)
    entity, codes = key // width, key % width
    order = np.lexsort((-counts, entity))  # by entity, the most frequent value first
    entity, codes = entity[order], codes[order]
    starts = np.searchsorted(entity, entity, side="left")
    rank = np.arange(len(entity)) - starts
    keep = rank < max_len
    out = np.zeros((n, max(1, min(max_len, int(rank.max()) + 1 if len(rank) else 1))), dtype=np.int64)
    out[entity[keep], rank[keep]] = codes[keep]
    return out


def _features(table, cols, users, items, n_users, n_items, user_features, item_features, path, report):
    ufeat: dict[str, np.ndarray] = {}
    ifeat: dict[str, np.ndarray] = {}
    for listed, owner, n, out, kind in (
        (user_features, users, n_users, ufeat, "user"),
        (item_features, items, n_items, ifeat, "item"),
    ):
        if listed is None:
            continue
        for col in listed:
            if col not in table.column_names:
                raise DataError(f"{path}: {kind} feature column {col!r} not found; columns are {table.column_names}")
            if _is_list(table.column(col)):  # a bag: the values of the entity's lists over its rows
                out[col] = bag_codes(table.column(col), owner, n)
                continue
            values = _per_entity(_column_codes(table.column(col)), owner, n)
            if values is None:
                raise DataError(f"{path}: {kind} feature {col!r} takes different values for the same {kind}")
            out[col] = values
    for col in cols:
        if col in ufeat or col in ifeat:
            continue
        if _is_list(table.column(col)):
            if user_features is None:  # a list column is a user bag unless it is named an item feature
                ufeat[col] = bag_codes(table.column(col), users, n_users)
            else:
                report.notes.append(f"list column {col!r} is not used (not among the named features)")
            continue
        codes = _column_codes(table.column(col))
        if user_features is None and (values := _per_entity(codes, users, n_users)) is not None:
            ufeat[col] = values
        elif item_features is None and (values := _per_entity(codes, items, n_items)) is not None:
            ifeat[col] = values
        else:
            report.notes.append(
                f"column {col!r} is not used (neither a stage nor a user or item feature; name it in "
                "data.context_features if it is request context, such as a scenario or an hour)"
            )
    if ufeat or ifeat:
        bags = sorted(c for c, v in (ufeat | ifeat).items() if v.ndim == 2)
        report.notes.append(
            f"user features: {sorted(ufeat)}; item features: {sorted(ifeat)}" + (f"; bags: {bags}" if bags else "")
        )
    return ufeat, ifeat
