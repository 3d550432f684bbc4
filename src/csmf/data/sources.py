"""The loader toolkit: what every layout's reader (Ali-CCP, AliExpress, KuaiRand, Tenrec, generic logs) hands the
Parquet cache (csmf.data.cache) and the in-memory split (csmf.data.filesplit): a `Source` (its files, options
and blocks of normalised rows), block readers with locators for clear errors, column checks, dictionary
encoding, and the seeded per-pair split a log without its own split gets.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from csmf.data.errors import DataError
from csmf.data.logtable import Locator, check_stage, refuse_compressed, unique_columns
from csmf.hashing import mix64

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass
class Source:
    """A log to convert: its files (fingerprinted), the options that change its meaning, the stage names, and
    `blocks()`, which yields normalised tables (user_id, item_id, split, one 0/1 int8 column per stage, features)
    with `user_features` / `item_features` naming the columns of each side (None = infer from the data)."""

    name: str
    files: list[Path]
    options: dict
    stages: tuple[str, ...]
    blocks: Callable[[], Iterator[pa.Table]]
    user_features: tuple[str, ...] | None = None
    item_features: tuple[str, ...] | None = None
    notes: list[str] = field(default_factory=list)
    # per-row context columns (csmf.data.context), kept per row; `context_required`: named by the user, so a
    # missing one is an error (a layout's default context is skipped when the files lack it)
    context: tuple[str, ...] = ()
    context_required: bool = False


def dictionary(column: pa.ChunkedArray | pa.Array) -> pa.DictionaryArray:
    """The column dictionary-encoded in one chunk: each distinct value once, and an index per row."""
    encoded = pc.dictionary_encode(column)
    return encoded.combine_chunks() if isinstance(encoded, pa.ChunkedArray) else encoded


def text_hash(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """crc32 of each value's text, computed once per distinct value of the block (an empty cell: 0)."""
    encoded = dictionary(column.cast(pa.string()))
    table = np.array([zlib.crc32(w.encode()) for w in encoded.dictionary.to_pylist()], dtype=np.uint64)
    index = encoded.indices.fill_null(0).to_numpy(zero_copy_only=False)
    hashed = table[index] if len(table) else np.zeros(len(index), dtype=np.uint64)
    return np.where(np.asarray(encoded.is_null()), np.uint64(0), hashed)


def pair_split(users: pa.Array, items: pa.Array, test_frac: float, valid_frac: float, seed: int) -> np.ndarray:
    """Split code per row from a seeded hash of its (user, item) pair: every row of a pair, in every stage,
    lands on the same side, so no test pair is ever trained on (the leak rule), whatever the block order."""
    with np.errstate(over="ignore"):
        key = mix64(text_hash(users) * np.uint64(0x9E3779B97F4A7C15) + text_hash(items) + np.uint64(seed))
    u = (key >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    code = np.full(len(u), SPLIT_CODES["train"], dtype=np.int8)
    code[u < test_frac + valid_frac * (1 - test_frac)] = SPLIT_CODES["val"]
    code[u < test_frac] = SPLIT_CODES["test"]
    return code


def file_blocks(
    path: Path, block_bytes: int = 64 << 20, text_columns: tuple[str, ...] = ()
) -> Iterator[tuple[Locator, pa.Table]]:
    """A CSV (with a header) or Parquet file in blocks: (a locator of the block's rows in the file, block).
    `text_columns` of a CSV are read as text (ids: "007" stays "007", whatever the first block holds)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".parquet":
        parquet = pq.ParquetFile(path)
        unique_columns(parquet.schema_arrow.names, path, "schema")
        batches = parquet.iter_batches(batch_size=1 << 20)
    else:
        if path.suffix in (".csv", ".tsv"):
            refuse_compressed(path)
        read = pacsv.ReadOptions(block_size=block_bytes)
        convert = pacsv.ConvertOptions(strings_can_be_null=True, column_types=dict.fromkeys(text_columns, pa.string()))
        batches = pacsv.open_csv(path, read_options=read, convert_options=convert)
        unique_columns(batches.schema.names, path)
    first = 0
    try:
        for batch in batches:
            yield _Offset(path, first), pa.Table.from_batches([batch])
            first += batch.num_rows
    except pa.ArrowInvalid as err:  # a block the reader cannot parse: say where the readable rows end
        raise DataError(f"{path}: cannot parse after data row {first:,}: {err}") from None


def require(table: pa.Table, path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {table.column_names}")


def no_empty(table: pa.Table, where: Locator, columns: tuple[str, ...]) -> None:
    for col in columns:
        if table.column(col).null_count:
            row = int(np.flatnonzero(np.asarray(pc.is_null(table.column(col))))[0])
            raise DataError(f"{where(row)}: column {col!r} is empty")


def log_source(
    path: Path, stages: tuple[str, ...], user_col: str, item_col: str, test_frac: float, valid_frac: float,
    seed: int, name: str, block_bytes: int = 64 << 20,
) -> Source:  # fmt: skip
    """A generic log (CSV or Parquet, e.g. the simulator's) as a cache source, read in blocks. Stages must be
    named (`--stages`): inference needs the whole file. The split is per pair (a seeded hash), not per user."""
    if not stages:
        raise DataError(f"{path}: name the stage columns (--stages) to convert a log into a cache")

    def blocks() -> Iterator[pa.Table]:
        for where, table in file_blocks(path, block_bytes, (user_col, item_col)):
            require(table, path, (user_col, item_col, *stages))
            no_empty(table, where, (user_col, item_col))
            out = {
                "user_id": table.column(user_col),
                "item_id": table.column(item_col),
                "split": pair_split(table.column(user_col), table.column(item_col), test_frac, valid_frac, seed),
            }
            out |= {s: pa.array(check_stage(table, s, where).astype(np.int8)) for s in stages}  # fmt: skip
            out |= {c: table.column(c) for c in table.column_names if c not in (user_col, item_col, *stages)}
            yield pa.table(out)

    options = {"layout": "log", "stages": list(stages), "user_col": user_col, "item_col": item_col,
               "test_frac": test_frac, "valid_frac": valid_frac, "seed": seed}  # fmt: skip
    if path.suffix != ".parquet":  # a CSV cache built before ids were read as text may have merged "007" with "7"
        options["ids"] = "text"
    # the cache keeps every id as its text, which is _ids_from_text's rule: a plain integer reads the same as text
    ids = f"{path.name}: ids {user_col!r} and {item_col!r} kept as written ('007' and '7' are two ids)"
    return Source(name=name, files=[path], options=options, stages=stages, blocks=blocks,
                  notes=[pair_split_note(path.name, test_frac, valid_frac), ids])  # fmt: skip


def pair_split_note(what: str, test_frac: float, valid_frac: float) -> str:
    return (f"{what}: split per (user, item) pair by a seeded hash (test {test_frac:.0%}, validation "
            f"{valid_frac:.0%} of the rest)")  # fmt: skip


class _Offset:
    """A Locator for block `first`.. of a file: data row r of the block is data row first + r of the file."""

    def __init__(self, path: Path, first: int):
        self.locate, self.first, self.path = Locator(path), first, path

    def __call__(self, row: int) -> str:
        return self.locate(self.first + row)
