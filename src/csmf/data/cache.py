"""The out-of-core path: a source log converted once, in blocks, into a Parquet cache that training and
evaluation stream from, so peak memory is bounded by the model and a batch buffer, not by the log.

Layout of a cache folder:

    manifest.json            what was converted (source files and their sha256, options), counts, timings;
                             written last, so a folder without it is an unfinished conversion
    users.parquet            the original id of every user index (sorted ids: index = rank)
    items.parquet            the same for items
    user_features.parquet    one row per user: the feature columns constant within every user (codes)
    item_features.parquet    one row per item: the same for items
    rows/bucket=NN/*.parquet every row: user, item (indices), split (0 train, 1 validation, 2 test), one
                             int8 column per stage, per-row feature codes; user u lives in bucket u % B

Conversion makes two passes: the source is read once, block by block, into staging files that keep the raw
ids (and the distinct ids and feature values are collected); then each staging file is re-read, encoded
(ids by rank in the sorted id list, feature values by their vocabulary or, above `hash_threshold`
distinct values, by a stable hash into `hash_buckets` buckets) and split into user buckets. Peak memory
is one block plus the id lists.

The stale-model rule holds for caches: the manifest records the sha256 of every source file and the
options; `ensure_cache` rebuilds a cache whose source changed, and never reuses a partial one.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from csmf.data.errors import DataError
from csmf.data.filesplit import apply_leak_rule
from csmf.data.schema import CascadeData, LoadReport, pairs_to_csr
from csmf.data.sources import SPLIT_CODES, Source, text_hash
from csmf.progress import bar

logger = logging.getLogger(__name__)

FORMAT = 1
BUILD_DEFAULTS = {"buckets": 16, "hash_threshold": 10_000, "hash_buckets": 4096}  # they change the encoding


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(source: Source) -> dict:
    """What a cache was built from: every source file's size and sha256, the options, the format."""
    files = []
    for path in sorted(source.files):
        if not path.exists():
            raise DataError(f"{path}: file not found")
        files.append({"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": file_digest(path)})
    # the context columns change what is kept per row, so they are part of what the cache was built from
    return {"format": FORMAT, "name": source.name, "files": files, "options": source.options,
            "context": list(source.context)}  # fmt: skip


class _Vocabulary:
    """Distinct values of a feature column, exact up to `threshold`, then a stable hash into `buckets`."""

    def __init__(self, threshold: int, buckets: int):
        self.threshold, self.buckets = threshold, buckets
        self.values: pa.Array | None = None
        self.hashed = False

    def add(self, column: pa.ChunkedArray | pa.Array) -> None:
        if self.hashed:
            return
        seen = pc.unique(column.cast(pa.string()))
        self.values = seen if self.values is None else pc.unique(pa.concat_arrays([self.values, seen]))
        if len(self.values) > self.threshold:
            self.hashed, self.values = True, None

    def freeze(self) -> None:
        if self.values is not None:
            self.values = pc.take(self.values, pc.sort_indices(self.values))

    @property
    def size(self) -> int:
        return self.buckets if self.hashed else (0 if self.values is None else len(self.values)) + 1

    def encode(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """int32 codes; 0 is reserved for an empty cell."""
        if self.hashed:  # an empty cell hashes to 0 as well
            return (text_hash(column) % np.uint64(self.buckets)).astype(np.int32)
        at = pc.index_in(column.cast(pa.string()), value_set=self.values)
        return (at.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1).astype(np.int32)


class _BagCounter:
    """How often each code appears in each entity's lists, merged block by block; `codes` gives the bags."""

    def __init__(self, size: int):
        self.size = size
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, entity: np.ndarray, codes: np.ndarray) -> None:
        keep = codes > 0
        keys = entity[keep].astype(np.int64) * self.size + codes[keep]
        merged, inverse = np.unique(np.concatenate([self.keys, keys]), return_inverse=True)
        weights = np.concatenate([self.counts, np.ones(len(keys), dtype=np.int64)])
        self.keys, self.counts = merged, np.bincount(inverse, weights=weights).astype(np.int64)

    def codes(self, n: int, max_len: int = 64) -> np.ndarray:
        """(n, L) each entity's most frequent codes first (as csmf.data.logtable.bag_codes), 0 = padding."""
        entity, code = self.keys // self.size, self.keys % self.size
        order = np.lexsort((-self.counts, entity))
        entity, code = entity[order], code[order]
        rank = np.arange(len(entity)) - np.searchsorted(entity, entity, side="left")
        keep = rank < max_len
        width = max(1, min(max_len, int(rank.max()) + 1 if len(rank) else 1))
        out = np.zeros((n, width), dtype=np.int64)
        out[entity[keep], rank[keep]] = code[keep]
        return out


def _unique_ids(parts: list[pa.Array]) -> pa.Array:
    merged = pc.unique(pa.concat_arrays(parts)) if len(parts) > 1 else parts[0]
    return pc.take(merged, pc.sort_indices(merged))


def build_cache(
    source: Source,
    folder: Path,
    buckets: int = 16,
    hash_threshold: int = 10_000,
    hash_buckets: int = 4096,
    progress: bool = False,
    identity: dict | None = None,
) -> dict:
    """Convert `source` into a cache at `folder` (replacing what is there); returns the manifest. `identity`:
    the source's fingerprint when the caller has just computed it (hashing gigabytes twice costs seconds)."""
    start = time.perf_counter()
    identity = dict(identity or fingerprint(source))
    identity["build"] = {"buckets": buckets, "hash_threshold": hash_threshold, "hash_buckets": hash_buckets}
    if folder.exists():
        shutil.rmtree(folder)
    staging = folder / "staging"
    staging.mkdir(parents=True)
    user_parts: list[pa.Array] = []
    item_parts: list[pa.Array] = []
    vocab: dict[str, _Vocabulary] = {}
    rows, staged = 0, []
    features: list[str] = []
    lists: list[str] = []
    # pass 1: read the source once; keep raw ids, collect the distinct ids and feature values
    for n, block in enumerate(bar(source.blocks(), progress, desc=f"convert {source.name}", unit="block")):
        if n == 0:
            missing = [c for c in ("user_id", "item_id", "split", *source.stages) if c not in block.column_names]
            if missing:
                raise DataError(f"{source.name}: the converter gave no column(s) {missing}")
            features = [c for c in block.column_names if c not in ("user_id", "item_id", "split", *source.stages)]
            lists = [c for c in features if pa.types.is_list(block.column(c).type)]
            features = [c for c in features if c not in lists]
            vocab = {c: _Vocabulary(hash_threshold, hash_buckets) for c in features + lists}
        user_parts.append(pc.unique(block.column("user_id").cast(pa.string())))
        item_parts.append(pc.unique(block.column("item_id").cast(pa.string())))
        if n % 16 == 15:  # keep the id lists short
            user_parts, item_parts = [_unique_ids(user_parts)], [_unique_ids(item_parts)]
        for c in features:
            vocab[c].add(block.column(c))
        for c in lists:
            if c in block.column_names:  # a list field may be absent from a block
                vocab[c].add(pc.list_flatten(block.column(c)))
        path = staging / f"part-{n:06d}.parquet"
        pq.write_table(block, path)
        staged.append(path)
        rows += block.num_rows
        del block
        pa.default_memory_pool().release_unused()  # hand freed blocks back, or the pool keeps its peak
    if not rows:
        raise DataError(f"{source.name}: the log has no rows")
    users, items = _unique_ids(user_parts), _unique_ids(item_parts)
    del user_parts, item_parts
    for v in vocab.values():
        v.freeze()
    n_users, n_items = len(users), len(items)
    # pass 2: encode and split into user buckets; per-entity min / max codes decide the side of a feature
    declared = source.user_features is not None or source.item_features is not None

    context = tuple(c for c in source.context if c in features)
    missing = [c for c in source.context if c not in features]
    if missing and source.context_required:
        raise DataError(f"{source.name}: context column(s) {missing} (data.context_features) not in the log; "
                        f"its columns are {features + lists}")  # fmt: skip

    def candidate_sides(c: str) -> tuple[str, ...]:  # declared sides are only checked, never guessed
        if c in context:  # request context stays per row
            return ()
        if not declared:
            return ("user", "item")
        if c in (source.user_features or ()):
            return ("user",)
        return ("item",) if c in (source.item_features or ()) else ()

    lo = {(c, s): np.full(n_users if s == "user" else n_items, np.iinfo(np.int32).max, np.int32)
          for c in features for s in candidate_sides(c)}  # fmt: skip
    hi = {key: np.full(len(arr), -1, np.int32) for key, arr in lo.items()}
    train_items = {s: np.zeros(n_items, dtype=np.int64) for s in source.stages}
    per_split = {s: 0 for s in SPLIT_CODES}
    positives = {s: 0 for s in source.stages}
    bag_side = {c: "item" if c in (source.item_features or ()) else "user" for c in lists}
    bags = {c: _BagCounter(vocab[c].size) for c in lists}
    writers: dict[int, pq.ParquetWriter] = {}
    bucket_rows: dict[str, int] = {}  # file under rows/ -> rows written: Cache checks the files against it
    try:
        for path in bar(staged, progress, desc="encode", unit="part"):
            block = pq.read_table(path)
            u = pc.index_in(block.column("user_id").cast(pa.string()), value_set=users).to_numpy().astype(np.int32)
            i = pc.index_in(block.column("item_id").cast(pa.string()), value_set=items).to_numpy().astype(np.int32)
            split = block.column("split").to_numpy().astype(np.int8)
            out = {"user": u, "item": i, "split": split}
            for s in source.stages:
                on = block.column(s).to_numpy().astype(np.int8)
                out[s] = on
                positives[s] += int(on.sum())
                train_items[s] += np.bincount(i[(on == 1) & (split == 0)], minlength=n_items)
            for c in features:
                codes = vocab[c].encode(block.column(c))
                out[c] = codes
                for side in candidate_sides(c):
                    owner = u if side == "user" else i
                    np.minimum.at(lo[(c, side)], owner, codes)
                    np.maximum.at(hi[(c, side)], owner, codes)
            for c in lists:
                if c in block.column_names:
                    column = block.column(c).combine_chunks()
                    parent = pc.list_parent_indices(column).to_numpy()
                    owner = u if bag_side[c] == "user" else i
                    bags[c].add(owner[parent], vocab[c].encode(pc.list_flatten(column)))
            for name, code in SPLIT_CODES.items():
                per_split[name] += int((split == code).sum())
            table = pa.table(out)  # per-row columns; the bags are per entity, written below
            bucket = u % buckets
            for b in np.unique(bucket):
                part = table.filter(pa.array(bucket == b))
                name = f"bucket={b:02d}/part-0.parquet"
                if b not in writers:
                    (folder / "rows" / f"bucket={b:02d}").mkdir(parents=True, exist_ok=True)
                    writers[b] = pq.ParquetWriter(folder / "rows" / name, part.schema)
                writers[b].write_table(part)
                bucket_rows[name] = bucket_rows.get(name, 0) + part.num_rows
            path.unlink()
            del block, table
            pa.default_memory_pool().release_unused()
    finally:
        for writer in writers.values():
            writer.close()
    shutil.rmtree(staging)
    # a feature is a user (item) feature when it is constant within every user (item) that has it
    sides: dict[str, str] = {}
    notes = list(source.notes)
    for c in features:
        sides[c] = next((s for s in candidate_sides(c) if np.array_equal(lo[(c, s)], hi[(c, s)])), "row")
        if declared and candidate_sides(c) and sides[c] == "row":  # as the in-memory loader: never silent
            side = candidate_sides(c)[0]
            raise DataError(f"{source.name}: {side} feature {c!r} takes different values for the same {side}")
    for side, ids in (("user", users), ("item", items)):
        cols = {"id": ids} | {c: pa.array(lo[(c, side)]) for c in features if sides[c] == side}
        for c in lists:
            if bag_side[c] == side:
                codes = bags[c].codes(len(ids))
                cols[c] = pa.FixedSizeListArray.from_arrays(pa.array(codes.ravel()), codes.shape[1])
        pq.write_table(pa.table(cols), folder / f"{side}s.parquet")
    seconds = time.perf_counter() - start
    manifest = {
        **identity,
        "stages": list(source.stages),
        "n_users": n_users,
        "n_items": n_items,
        "buckets": buckets,
        "rows": rows,
        "bucket_rows": dict(sorted(bucket_rows.items())),
        "rows_per_split": per_split,
        "stage_rows": positives,
        "features": {c: {"side": sides[c], "size": vocab[c].size, "hashed": vocab[c].hashed} for c in features}
        | {c: {"side": bag_side[c], "size": vocab[c].size, "hashed": vocab[c].hashed, "bag": True} for c in lists},
        "context": list(context),
        "notes": notes
        + [f"context columns (per row): {list(context)}"]
        + [f"per-row columns not used: {[c for c in features if sides[c] == 'row' and c not in context]}"],
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows / max(seconds, 1e-9)),
    }
    np.savez_compressed(folder / "train_item_counts.npz", **train_items)
    (folder / "manifest.json.partial").write_text(json.dumps(manifest, indent=1))
    (folder / "manifest.json.partial").replace(folder / "manifest.json")  # the cache is complete
    return manifest


class DamagedCache(DataError):
    """A cache file missing, cut or not the one the manifest records: named with the fix."""

    def __init__(self, path: Path, problem: str, folder: Path):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}; the cache in {folder} is damaged: delete that folder and run again to "
                         "convert the log afresh (csmf converts a damaged cache again by itself when it still finds "
                         "the source files)")  # fmt: skip


class Cache:
    """A finished cache folder: its manifest, its rows streamed by bucket, and in-memory views of it."""

    def __init__(self, folder: Path):
        self.folder = folder
        manifest = folder / "manifest.json"
        if not manifest.exists():
            raise DataError(f"{folder}: no manifest.json; not a finished csmf cache (convert again)")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{folder}: cache format {self.manifest.get('format')}, this csmf reads {FORMAT}")
        self.stages = tuple(self.manifest["stages"])
        self.n_users, self.n_items = self.manifest["n_users"], self.manifest["n_items"]
        self.context = tuple(self.manifest.get("context", ()))  # per-row context columns (csmf.data.context)
        self._aux_counts: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}  # aux_item_counts, read once
        self._check_files()

    def _damaged(self, path: Path, problem: str) -> DamagedCache:
        return DamagedCache(path, problem, self.folder)

    def _rows_in(self, path: Path) -> int:
        """Rows of a Parquet file from its footer alone (kilobytes): a missing or cut file is named here."""
        if not path.is_file():
            raise self._damaged(path, "missing")
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as err:  # a cut file has lost its footer
            raise self._damaged(path, f"not a readable Parquet file ({err})") from None

    def _check_files(self) -> None:
        """Every file the manifest promises, with the rows it records: a deleted or truncated bucket is an error
        naming the file, never a silently short load."""
        for side, n in (("user", self.n_users), ("item", self.n_items)):
            if (rows := self._rows_in(self.folder / f"{side}s.parquet")) != n:
                raise self._damaged(self.folder / f"{side}s.parquet", f"{rows:,} rows, the manifest records {n:,}")
        if not (self.folder / "train_item_counts.npz").is_file():
            raise self._damaged(self.folder / "train_item_counts.npz", "missing")
        listed = self.manifest.get("bucket_rows")
        found = {path.relative_to(self.folder / "rows").as_posix(): path for path in self.bucket_files()}
        if listed is None:  # a cache from before the manifest listed its buckets: only the total can be checked
            total = sum(self._rows_in(path) for path in found.values())
            if total != self.manifest["rows"]:
                raise self._damaged(self.folder / "rows", f"{total:,} rows, the manifest records "
                                    f"{self.manifest['rows']:,}")  # fmt: skip
            return
        for name, rows in listed.items():
            path = self.folder / "rows" / name
            if (held := self._rows_in(path)) != rows:
                raise self._damaged(path, f"{held:,} rows, the manifest records {rows:,}")
        extra = sorted(set(found) - set(listed))
        if extra:
            raise self._damaged(found[extra[0]], "not written by the conversion (its rows would be read as the log's)")

    def bucket_files(self) -> list[Path]:
        return sorted((self.folder / "rows").glob("bucket=*/*.parquet"))

    def _batches(self, path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """A bucket file's batches; a file damaged inside (its footer intact) is named, not a pyarrow traceback."""
        try:
            yield from pq.ParquetFile(path).iter_batches(columns=columns)
        except (pa.ArrowInvalid, OSError) as err:
            raise self._damaged(path, f"cannot be read ({err})") from None

    def blocks(self, path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The record batches of one bucket file (`bucket_files`), `columns` only: what a reader outside this
        class streams (csmf.data.stream_history)."""
        yield from self._batches(path, columns)

    def train_item_counts(self, stage: str) -> np.ndarray:
        with np.load(self.folder / "train_item_counts.npz") as counts:
            return counts[stage]

    def aux_item_counts(self, stage: str, aux: tuple[str, ...]) -> np.ndarray:
        """(N,) the auxiliary training rows of `stage` per item (`weighted_batches`): one read of the cache, kept
        for the next phase of the same stage."""
        key = (stage, tuple(aux))
        if key not in self._aux_counts:
            counts = np.zeros(self.n_items, np.int64)
            for path in self.bucket_files():
                for batch, _, extra in self._stage_rows(path, stage, key[1], ["user", "item"]):
                    counts += np.bincount(batch.column("item").to_numpy()[extra], minlength=self.n_items)
            self._aux_counts[key] = counts
        return self._aux_counts[key]

    def _positive_pairs(self, path: Path, stage: str) -> np.ndarray:
        """Sorted user * N + item keys of the training positives of `stage` in one bucket file."""
        keys = [np.zeros(0, np.int64)]
        for batch in self._batches(path, ["user", "item", "split", stage]):
            on = (batch.column("split").to_numpy() == 0) & (batch.column(stage).to_numpy() == 1)
            keys.append(batch.column("user").to_numpy()[on].astype(np.int64) * self.n_items
                        + batch.column("item").to_numpy()[on])  # fmt: skip
        return np.unique(np.concatenate(keys))

    def _stage_rows(self, path: Path, stage: str, aux: tuple[str, ...],
                    columns: list[str]) -> Iterator[tuple[pa.RecordBatch, np.ndarray, np.ndarray | None]]:  # fmt: skip
        """Each batch of a bucket file with its rows' masks: the training rows of `stage`, and (with `aux`, else
        None) the training rows of an `aux` stage whose pair is not a training positive of `stage`. Every row of a
        user is in its bucket, so the bucket's positives (read first, one pass over 4 columns) are the user's.
        `columns` must hold "user" and "item" when `aux` is given."""
        own_pairs = self._positive_pairs(path, stage) if aux else None
        for batch in self._batches(path, [*columns, "split", stage, *aux]):
            train = batch.column("split").to_numpy() == 0
            own = train & (batch.column(stage).to_numpy() == 1)
            if own_pairs is None:
                yield batch, own, None
                continue
            other = np.zeros(len(own), dtype=bool)
            for name in aux:
                other |= batch.column(name).to_numpy() == 1
            key = batch.column("user").to_numpy().astype(np.int64) * self.n_items + batch.column("item").to_numpy()
            at = np.minimum(np.searchsorted(own_pairs, key), max(len(own_pairs) - 1, 0))
            positive = own_pairs[at] == key if len(own_pairs) else np.zeros(len(key), dtype=bool)
            yield batch, own, train & ~own & other & ~positive

    def features(self, side: str) -> dict[str, np.ndarray]:
        """Per-entity feature codes: (n,) for a categorical, (n, L) for a bag (0 = padding)."""
        table = pq.read_table(self.folder / f"{side}s.parquet")
        out = {}
        for c in table.column_names:
            column = table.column(c).combine_chunks()
            if c == "id":
                continue
            if pa.types.is_fixed_size_list(column.type):
                out[c] = column.flatten().to_numpy().reshape(len(column), column.type.list_size)
            else:
                out[c] = column.to_numpy()
        return out

    def ids(self, side: str) -> np.ndarray:
        return pq.read_table(self.folder / f"{side}s.parquet", columns=["id"]).column("id").to_numpy(
            zero_copy_only=False)  # fmt: skip

    def held_out_users(self) -> np.ndarray:
        """Every user with a validation or test row."""
        found = []
        for path in self.bucket_files():
            for batch in self._batches(path, ["user", "split"]):
                found.append(np.unique(batch.column("user").to_numpy()[batch.column("split").to_numpy() != 0]))
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int32)

    def matrix(self, stage: str, split: str, users: np.ndarray | None = None) -> sp.csr_matrix:
        return self.matrices(users)[split][stage]

    def matrices(self, users: np.ndarray | None = None) -> dict[str, dict[str, sp.csr_matrix]]:
        """split -> stage -> the (user, item) pairs positive there, from one read of the rows (optionally only
        the rows of `users`); "context" -> column -> each pair's code in its last row (csmf.data.context)."""
        found: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
        rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (users, items, codes (n, C)) of every row
        for path in self.bucket_files():
            columns = ["user", "item", "split", *self.stages, *self.context]
            for batch in self._batches(path, columns):
                u, i = batch.column("user").to_numpy(), batch.column("item").to_numpy()
                split = batch.column("split").to_numpy()
                inside = np.isin(u, users) if users is not None else np.ones(len(u), dtype=bool)
                for name, code in SPLIT_CODES.items():
                    for stage in self.stages:
                        keep = inside & (split == code) & (batch.column(stage).to_numpy() == 1)
                        if keep.any():
                            found.setdefault((name, stage), []).append((u[keep], i[keep]))
                if self.context:
                    codes = np.stack([batch.column(c).to_numpy() for c in self.context], axis=1)
                    rows.append((u[inside], i[inside], codes[inside]))
        out: dict[str, dict[str, sp.csr_matrix]] = {}
        for name in SPLIT_CODES:
            for stage in self.stages:
                parts = found.get((name, stage), [])
                us = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
                its = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
                out.setdefault(name, {})[stage] = pairs_to_csr(us, its, self.n_users, self.n_items)
        found.clear()  # the pairs are in the matrices now
        give_back_freed_memory()
        out["context"] = self._pair_context(rows)
        return out

    def _pair_context(self, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, sp.csr_matrix]:
        """Each context column's code of every pair, from its last row read; `rows` is emptied as it is read.

        Built straight into CSR from the sorted pair keys (user * n_items + item sorts row-major), with one int64
        array of the rows' length alive at a time besides the sort's: on the 42M-row release the COO route held
        ~4 GB of int64 copies at once (peak RSS 6.1 GB, 2.2 GB before and after)."""
        if not self.context:
            return {}
        n = sum(len(r[0]) for r in rows)
        key = np.empty(n, np.int64)
        codes = np.empty((n, len(self.context)), rows[0][2].dtype if rows else np.int64)
        at = 0
        rows.reverse()
        while rows:  # in the order read, each batch freed once copied in
            u, i, c = rows.pop()
            np.multiply(u, self.n_items, out=key[at : at + len(u)], dtype=np.int64)
            key[at : at + len(u)] += i
            codes[at : at + len(u)] = c
            at += len(u)
        order = np.argsort(key, kind="stable")  # a pair's rows in the order they were read
        key = key[order]
        ends = np.flatnonzero(np.r_[key[1:] != key[:-1], True]) if n else np.zeros(0, np.int64)
        last = order[ends]  # each pair's last row
        del order
        pairs = key[ends]
        del key
        users, items = np.divmod(pairs, self.n_items)
        indptr = np.zeros(self.n_users + 1, np.int64)
        np.cumsum(np.bincount(users, minlength=self.n_users), out=indptr[1:])
        index = np.int32 if len(pairs) < 2**31 and self.n_items < 2**31 else np.int64
        indices, indptr = items.astype(index), indptr.astype(index)
        shape = (self.n_users, self.n_items)
        # the codes keep the cache's int32 (4 bytes a pair less than int64: 136 MB on the 42M-row release)
        return {c: sp.csr_matrix((codes[last, k], indices, indptr), shape=shape) for k, c in enumerate(self.context)}

    def context_sizes(self) -> dict[str, int]:
        """Rows of each context column's table: its vocabulary size (code 0 = an empty cell, unknown)."""
        return {c: int(self.manifest["features"][c]["size"]) for c in self.context}

    def batches(
        self, stage: str, batch_size: int, seed: int, buffer_rows: int = 1 << 20
    ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        """Training (users, items, context codes) batches of `stage`: buckets in a seeded order, rows shuffled
        within a buffer of `buffer_rows`; every training row once (a pair logged twice counts twice), each with
        its own row's context (column -> codes; empty without context columns)."""
        for users, items, codes, _ in self.weighted_batches(stage, batch_size, seed, buffer_rows):
            yield users, items, codes

    def weighted_batches(
        self, stage: str, batch_size: int, seed: int, buffer_rows: int = 1 << 20, aux: tuple[str, ...] = (),
        aux_weight: float = 0.0,
    ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray | None]]:  # fmt: skip
        """`batches` with each row's loss weight (None: every row weighs 1). With `aux` (other stages) and
        `aux_weight` > 0 the training rows of an aux stage whose pair is not a training positive of `stage` come
        too, shuffled in with the stage's own (weight 1), at `aux_weight`: train.aux_weight's rule
        (csmf.data.batches.stage_pairs) by row, so an aux pair logged twice counts twice, as own rows do. Without
        aux rows the draws and batches are those of `batches` before weights existed."""
        rng = np.random.default_rng(seed)
        files = self.bucket_files()
        order = rng.permutation(len(files))
        names = ("user", "item", *self.context)
        aux = tuple(aux) if aux_weight > 0 else ()
        width = len(names) + bool(aux)  # the weights ride as one more column
        held_parts: list[list[np.ndarray]] = []
        held = 0

        def drain(final: bool) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray | None]]:
            nonlocal held_parts, held
            cols = [np.concatenate([p[k] for p in held_parts]) for k in range(width)]
            perm = rng.permutation(len(cols[0]))
            cols = [c[perm] for c in cols]
            full = len(perm) if final else (len(perm) // batch_size) * batch_size
            for s in range(0, full, batch_size):
                part = [c[s : s + batch_size] for c in cols]
                codes = dict(zip(self.context, part[2 : len(names)], strict=True))
                yield part[0], part[1], codes, part[-1] if aux else None
            held_parts, held = [[c[full:] for c in cols]], len(perm) - full

        for k in order:
            for batch, own, extra in self._stage_rows(files[k], stage, aux, list(names)):
                keep = own if extra is None else own | extra
                held_parts.append([batch.column(c).to_numpy()[keep].astype(np.int64) for c in names])
                if aux:
                    held_parts[-1].append(np.where(own[keep], 1.0, aux_weight).astype(np.float32))
                held += int(keep.sum())
                if held >= buffer_rows:
                    yield from drain(final=False)
        if held:
            yield from drain(final=True)

    def cascade(self, name: str, users: np.ndarray | None = None) -> CascadeData:
        """The cache as an in-memory CascadeData (optionally only the rows of `users`: what evaluating
        those users needs), with the leak rule of release splits applied."""
        report = LoadReport(str(self.folder))
        report.rows_read = int(self.manifest["rows"])
        parts = self.matrices(users)
        give_back_freed_memory()  # the rows read are gone: their pages go back before the leak rule allocates
        train, valid, test = parts["train"], parts["val"], parts["test"]
        if self.context:
            report.notes.append(f"context columns (per row, each pair's last value): {list(self.context)}")
        apply_leak_rule(self.stages, train, valid, test, report)
        report.notes.extend(self.manifest.get("notes", []))
        give_back_freed_memory()  # and the leak rule's unions, before training allocates
        return CascadeData(
            name=name, stages=self.stages, n_users=self.n_users, n_items=self.n_items,
            train=train, valid=valid, test=test, exclude={s: self.stages for s in self.stages},
            user_ids=self.ids("user"), item_ids=self.ids("item"),
            user_features=self.features("user"), item_features=self.features("item"), report=report,
            context=parts["context"],
        )  # fmt: skip


def give_back_freed_memory() -> None:
    """Hand the C heap's freed pages back to the system (glibc's malloc_trim; nothing elsewhere). After the
    42M-row release was read into memory, glibc kept 1.1 GB of freed row buffers: resident 2.3 GB, 1.2 GB after."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): its allocator decides
        pass


def ensure_cache(source: Source, folder: Path, progress: bool = False, log: Callable[[str], None] = logger.info,
                 **options) -> Cache:  # fmt: skip
    """The cache of `source` at `folder`: reused when its manifest matches the source files and options now,
    rebuilt otherwise (a changed source file invalidates it; a partial or damaged one is never read)."""
    manifest = folder / "manifest.json"
    identity = fingerprint(source)
    if manifest.exists():
        cached = json.loads(manifest.read_text())
        now = identity | {"build": {k: options.get(k, v) for k, v in BUILD_DEFAULTS.items()}}
        if all(cached.get(k) == v for k, v in now.items()):
            try:
                return Cache(folder)
            except DamagedCache as err:  # a cache is derived data: a damaged one is converted again, and said
                log(f"cache {folder}: {err.path} {err.problem}; converting again")
        else:
            log(f"cache {folder}: the source or its options changed since it was built; converting again")
    elif folder.exists() and any(folder.iterdir()):
        log(f"cache {folder}: unfinished conversion found; converting again")
    build_cache(source, folder, progress=progress, identity=identity, **options)
    return Cache(folder)
