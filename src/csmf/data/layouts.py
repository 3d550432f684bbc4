"""The simulated log written in the public datasets' own layouts (Ali-CCP processed and raw, AliExpress,
KuaiRand, Tenrec), so every loader can be tested at any size without the real data. Written chunk by chunk
(the simulator's chunks of users), so memory stays bounded at any size.

What maps to what, in every layout: exposure = every row, click = click, the third stage = conversion;
user features = the simulator's `user_segment`, item features = `item_category` (and `item_f*` when
`sim.item_features` asks for them); requests / searches / days come from the row's timestamp.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from csmf.config import ConfigError

LAYOUTS = ("aliccp", "aliccp-raw", "aliexpress", "kuairand", "tenrec")
ALICCP_ITEM_FIELDS = ("207", "216")  # shop and brand: where the simulator's item_f0, item_f1 go in Ali-CCP
DAY = 86_400


class _Files:
    """CSV files opened on first write, each with its own header (or none), closed together."""

    def __init__(self, folder: Path):
        self.folder, self.writers, self.streams = folder, {}, {}

    def write(self, name: str, table: pa.Table, header: bool = True) -> None:
        if name not in self.writers:
            stream = pa.OSFile(str(self.folder / (name + ".partial")), "wb")
            if header:  # written by hand: arrow quotes header names, the releases do not
                stream.write((",".join(table.column_names) + "\n").encode())
            options = pacsv.WriteOptions(include_header=False, quoting_style="none")
            self.streams[name] = stream
            self.writers[name] = pacsv.CSVWriter(stream, table.schema, write_options=options)
        self.writers[name].write_table(table)

    def close(self, complete: bool) -> list[Path]:
        for writer in self.writers.values():
            writer.close()
        for stream in self.streams.values():
            stream.close()
        done = []
        for name in self.writers:
            partial = self.folder / (name + ".partial")
            if complete:
                partial.replace(self.folder / name)  # only a complete file carries its final name
                done.append(self.folder / name)
            else:
                partial.unlink(missing_ok=True)
        return done


def _split_of(chunk: pa.Table, seed: int, shares: tuple[float, ...]) -> np.ndarray:
    """Per row: 0 (train), 1 (val), 2 (test), drawn by row from a seeded stream (shares sum to 1)."""
    rng = np.random.default_rng([seed, 11, int(chunk.column("user_id")[0].as_py())])
    return np.searchsorted(np.cumsum(shares), rng.random(chunk.num_rows), side="right").clip(0, len(shares) - 1)


def _request(chunk: pa.Table) -> np.ndarray:
    """One request (search, session) per user and half-month: the Ali-CCP / AliExpress grouping of
    impressions (the real Ali-CCP has about 58 impressions per request; a simulated user has about 40)."""
    half = chunk.column("timestamp").to_numpy() // (15 * DAY)
    return chunk.column("user_id").to_numpy().astype(np.int64) * 10 + half % 10


def _md5(values: np.ndarray) -> pa.Array:
    """The md5 request key of each value (computed once per distinct value)."""
    distinct, inverse = np.unique(values, return_inverse=True)
    keys = pa.array([hashlib.md5(str(v).encode()).hexdigest() for v in distinct])
    return keys.take(pa.array(inverse))


def _item_columns(chunk: pa.Table) -> list[str]:
    return ["item_category", *sorted(c for c in chunk.column_names if c.startswith("item_f"))]


def _entries(field: str, values: pa.Array) -> pa.Array:
    head = pc.binary_join_element_wise(pa.scalar(field), pc.cast(values, pa.string()), "\x02")
    return pc.binary_join_element_wise(head, pa.scalar("1.0"), "\x03")


def _feature_list(pairs: list[tuple[str, pa.Array]]) -> tuple[pa.Array, pa.Array]:
    """(feature_num, feature_list) of field\x02feature\x03value entries joined by \x01."""
    entries = [_entries(f, v) for f, v in pairs]
    joined = pc.binary_join_element_wise(*entries, "\x01")
    return pa.array(np.full(len(joined), len(pairs), dtype=np.int64)), joined


def _scenario(chunk: pa.Table, n: int) -> np.ndarray:
    """The per-row context: the simulator's scenario (sim.scenarios > 0, carries signal), else a value
    derived from the timestamp (no signal: the column exists, as in the real files)."""
    if "scenario" in chunk.column_names:
        return np.asarray(chunk.column("scenario")).astype(np.int64)
    return np.asarray(chunk.column("timestamp")) % n


def write_aliccp(chunk: pa.Table, files: _Files, seed: int) -> None:
    split = _split_of(chunk, seed, (0.8, 0.1, 0.1))
    cols = {"click": chunk.column("click"), "purchase": chunk.column("conversion"),
            "101": chunk.column("user_id"), "121": chunk.column("user_segment"),
            "205": chunk.column("item_id"), "206": chunk.column("item_category")}  # fmt: skip
    for field, name in zip(ALICCP_ITEM_FIELDS, _item_columns(chunk)[1:], strict=False):
        cols[field] = chunk.column(name)
    cols["301"] = _scenario(chunk, 3) + 1
    table = pa.table(cols)
    for k, name in enumerate(("train", "val", "test")):
        part = table.filter(pa.array(split == k))
        if part.num_rows:
            files.write(f"ali_ccp_{name}.csv", part)


def write_aliccp_raw(chunk: pa.Table, files: _Files, seed: int) -> None:
    request = _request(chunk)
    split = _split_of(chunk, seed, (0.8, 0.2))
    for k, name in enumerate(("train", "test")):
        rows = np.flatnonzero(split == k)
        if not len(rows):
            continue
        part = chunk.take(pa.array(rows))
        keys = _md5(request[rows])
        # the request's common features: user id and profile, once per request key
        first = np.unique(request[rows], return_index=True)[1]
        segment = part.column("user_segment").take(pa.array(first))
        # 109_14 is a list field: two entries per request (the behaviour lists of the real release)
        num, lists = _feature_list([("101", part.column("user_id").take(pa.array(first))), ("121", segment),
                                    ("109_14", segment), ("109_14", pc.add(segment, 7))])  # fmt: skip
        files.write(f"common_features_{name}.csv", pa.table({"k": keys.take(pa.array(first)), "n": num, "f": lists}),
                    header=False)  # fmt: skip
        pairs = [("205", part.column("item_id")), ("206", part.column("item_category"))]
        pairs += [(f, part.column(c)) for f, c in zip(ALICCP_ITEM_FIELDS, _item_columns(part)[1:], strict=False)]
        pairs.append(("301", pa.array(_scenario(part, 3) + 1)))
        num, lists = _feature_list(pairs)
        sample = np.arange(len(rows), dtype=np.int64) + int(part.column("user_id")[0].as_py()) * 10_000
        files.write(f"sample_skeleton_{name}.csv",
                    pa.table({"id": sample, "click": part.column("click"), "conversion": part.column("conversion"),
                              "key": keys, "n": num, "f": lists}), header=False)  # fmt: skip


def write_aliexpress(chunk: pa.Table, files: _Files, seed: int) -> None:
    """16 categorical and 63 numerical columns as the release has them: categorical_1..8 and numerical_1..20
    describe the search (constant within it), categorical_9..16 the item (the item id in base-32 digits and
    its category), numerical_21..63 the impression."""
    split = _split_of(chunk, seed, (0.8, 0.2))
    rng = np.random.default_rng([seed, 12, int(chunk.column("user_id")[0].as_py())])
    request = _request(chunk)
    n = chunk.num_rows
    item = chunk.column("item_id").to_numpy()
    segment = chunk.column("user_segment").to_numpy()
    cols: dict[str, object] = {"search_id": request}
    for k in range(1, 9):
        cols[f"categorical_{k}"] = (segment * (k + 1) + (request % 7 if k == 8 else 0)) % (4 + k)
    cols["categorical_9"] = chunk.column("item_category").to_numpy()
    for k in range(10, 17):
        cols[f"categorical_{k}"] = (item // 32 ** (k - 10)) % 32
    search_stats = np.random.default_rng([seed, 13]).random((64, 20))
    for k in range(1, 21):
        cols[f"numerical_{k}"] = np.round(search_stats[segment % 64, k - 1], 6)
    for k in range(21, 64):
        cols[f"numerical_{k}"] = np.round(rng.random(n), 6)
    cols["click"], cols["conversion"] = chunk.column("click"), chunk.column("conversion")
    table = pa.table(cols)
    for k, name in enumerate(("train", "test")):
        part = table.filter(pa.array(split == k))
        if part.num_rows:
            files.write(f"aliexpress_{name}.csv", part)


def write_kuairand(chunk: pa.Table, files: _Files, seed: int, seen: dict) -> None:
    rng = np.random.default_rng([seed, 14, int(chunk.column("user_id")[0].as_py())])
    n = chunk.num_rows
    ts = chunk.column("timestamp").to_numpy()
    duration = 5_000 + (chunk.column("item_id").to_numpy() * 7919) % 60_000
    long_view = chunk.column("conversion").to_numpy().astype(bool)
    limit = np.minimum(duration, 18_000)
    play = np.where(long_view, limit + rng.integers(0, 5_000, n), (limit * rng.random(n) * 0.9).astype(np.int64))
    clicked = chunk.column("click").to_numpy().astype(bool)
    files.write("log_standard_sim.csv", pa.table({
        "user_id": chunk.column("user_id"), "video_id": chunk.column("item_id"), "time_ms": ts * 1000,
        "is_click": chunk.column("click"), "is_like": (clicked & (rng.random(n) < 0.1)).astype(np.int8),
        "is_follow": np.zeros(n, dtype=np.int8), "is_comment": np.zeros(n, dtype=np.int8),
        "is_forward": np.zeros(n, dtype=np.int8), "long_view": long_view.astype(np.int8),
        "play_time_ms": play, "duration_ms": duration, "tab": _scenario(chunk, 5),
    }))  # fmt: skip
    users, first = np.unique(chunk.column("user_id").to_numpy(), return_index=True)
    files.write("user_features_sim.csv", pa.table({
        "user_id": users, "user_active_degree": chunk.column("user_segment").take(pa.array(first)),
    }))  # fmt: skip
    items, first = np.unique(chunk.column("item_id").to_numpy(), return_index=True)
    new = ~np.isin(items, seen.setdefault("items", np.zeros(0, dtype=np.int64)))
    if new.any():
        seen["items"] = np.union1d(seen["items"], items[new])
        files.write("video_features_basic_sim.csv", pa.table({
            "video_id": items[new], "video_type": chunk.column("item_category").take(pa.array(first[new])),
        }))  # fmt: skip


def write_tenrec(chunk: pa.Table, files: _Files, seed: int) -> None:
    rng = np.random.default_rng([seed, 15, int(chunk.column("user_id")[0].as_py())])
    n = chunk.num_rows
    clicked = chunk.column("click").to_numpy().astype(bool)
    files.write("QK-video.csv", pa.table({
        "user_id": chunk.column("user_id"), "item_id": chunk.column("item_id"), "click": chunk.column("click"),
        "follow": (clicked & (rng.random(n) < 0.02)).astype(np.int8), "like": chunk.column("conversion"),
        "share": (clicked & (rng.random(n) < 0.01)).astype(np.int8),
        "video_category": chunk.column("item_category"), "watching_times": rng.integers(0, 4, n),
        "gender": chunk.column("user_segment").to_numpy() % 3, "age": chunk.column("user_segment").to_numpy() % 8,
    }))  # fmt: skip


def write_layout(chunks: Iterator[pa.Table], layout: str, folder: Path, seed: int,
                 on_chunk: Callable[[pa.Table], None] = lambda _t: None) -> list[Path]:  # fmt: skip
    """Write every chunk in `layout` under `folder`; returns the files written (complete ones only)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: one of {list(LAYOUTS)}")
    folder.mkdir(parents=True, exist_ok=True)
    files, seen, complete = _Files(folder), {}, False
    try:
        for chunk in chunks:
            if layout == "aliccp":
                write_aliccp(chunk, files, seed)
            elif layout == "aliccp-raw":
                write_aliccp_raw(chunk, files, seed)
            elif layout == "aliexpress":
                write_aliexpress(chunk, files, seed)
            elif layout == "kuairand":
                write_kuairand(chunk, files, seed, seen)
            else:
                write_tenrec(chunk, files, seed)
            on_chunk(chunk)
        complete = True
    finally:
        done = files.close(complete)
    return done
