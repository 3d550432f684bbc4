"""KuaiRand (Gao et al., CIKM 2022; kuairand.com) as its owners distribute it, mapped onto the cascade.

Files read from a folder:
- logs: `log_standard_*.csv` and `log_random_*.csv` (every row one exposure of a video to a user), or,
  when neither is there, the joined sample layout `kuairand_sample*.csv` (logs with the user and video
  feature columns already joined);
- features (optional): `user_features*.csv` (one row per user_id), `video_features_basic*.csv` (one row per
  video_id), joined onto the log rows.

Stages: exposure = every logged row, click = `is_click`, then a conversion-like action, `long_view` by
default (`data.kuairand_conversion`: long_view, is_like, is_follow, is_comment, is_forward). When the
log has no `long_view` column (the joined sample), it is derived as KuaiRand defines it: the play time
reaches the video's duration for videos up to 18 s, and 18 s for longer ones. Feature columns constant
within every user (video) become user (item) features, as in the generic loader. Every error names the
file and line it comes from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from csmf.data.context import resolve, wanted
from csmf.data.errors import DataError
from csmf.data.logtable import Concatenated, Locator, check_stage, log_from_table, read_table
from csmf.data.schema import CascadeLog

CONVERSIONS = ("long_view", "is_like", "is_follow", "is_comment", "is_forward")
LONG_VIEW_MS = 18_000  # KuaiRand's long view: 18 s, or the whole video when it is shorter
# the feature columns of user_features*.csv and video_features_basic*.csv, as the joined sample carries them;
# every other log column (play times, tab, date, other actions) is per row: neither a stage nor a feature,
# except the request context (csmf.data.context): by default `tab`, the app page the video was shown on
CONTEXT_COLUMNS = ("tab",)
USER_COLUMNS = ("user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
                "follow_user_num", "follow_user_num_range", "fans_user_num", "fans_user_num_range",
                "friend_user_num", "friend_user_num_range", "register_days", "register_days_range",
                *(f"onehot_feat{i}" for i in range(18)))  # fmt: skip
VIDEO_COLUMNS = ("author_id", "video_type", "upload_dt", "upload_type", "visible_status", "video_duration",
                 "server_width", "server_height", "music_id", "music_type", "tag")  # fmt: skip


def kuairand_files(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(logs, user feature files, video feature files) in `folder`; an error says what was expected."""
    if not folder.is_dir():
        raise DataError(
            f"{folder}: not a folder; give the folder holding the KuaiRand csv files (--set data.data_dir=DIR)"
        )
    logs = sorted(folder.glob("log_standard_*.csv")) + sorted(folder.glob("log_random_*.csv"))
    logs = logs or sorted(folder.glob("kuairand_sample*.csv"))
    if not logs:
        raise DataError(f"{folder}: no KuaiRand logs; expected log_standard_*.csv (and log_random_*.csv), "
                        "or the joined sample kuairand_sample.csv")  # fmt: skip
    return logs, sorted(folder.glob("user_features*.csv")), sorted(folder.glob("video_features_basic*.csv"))


def _require(table: pa.Table, path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {table.column_names}")


def _long_view(table: pa.Table, path: Path) -> pa.Array:
    """KuaiRand's long_view from play and duration times (both in ms)."""
    _require(table, path, ("play_time_ms", "duration_ms"))
    play = table.column("play_time_ms").to_numpy(zero_copy_only=False).astype(np.float64)
    duration = table.column("duration_ms").to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~(np.isfinite(play) & np.isfinite(duration))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{Locator(path)(row)}: play_time_ms / duration_ms must be numbers to derive long_view")
    return pa.array((play >= np.minimum(duration, LONG_VIEW_MS)).astype(np.int8))


def _features(paths: list[Path], key: str) -> pa.Table | None:
    if not paths:
        return None
    tables = []
    for path in paths:
        table = read_table(path)
        _require(table, path, (key,))
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="default")
    keys = table.column(key).to_numpy(zero_copy_only=False)
    if len(np.unique(keys)) != len(keys):
        raise DataError(f"{', '.join(map(str, paths))}: {key} repeats; a feature file holds one row per {key}")
    return table


def load_kuairand(
    folder: str | Path, conversion: str = "long_view", context_features: tuple[str, ...] | None = None
) -> CascadeLog:
    """The KuaiRand cascade exposure -> click -> `conversion` from the files in `folder`; context_features:
    per-row context columns, None = `tab` (the page of the app the video was shown on)."""
    asked = wanted(context_features, CONTEXT_COLUMNS)
    if conversion not in CONVERSIONS:
        raise DataError(f"data.kuairand_conversion: {conversion!r} is not one of {list(CONVERSIONS)}")
    folder = Path(folder)
    logs, user_files, video_files = kuairand_files(folder)
    parts, sizes, derived = [], [], False
    for path in logs:
        table = read_table(path)
        _require(table, path, ("user_id", "video_id", "is_click"))
        where = Locator(path)
        click = check_stage(table, "is_click", where)
        if conversion in table.column_names:
            later = check_stage(table, conversion, where)
        elif conversion == "long_view":
            later, derived = _long_view(table, path).to_numpy().astype(bool), True
        else:
            raise DataError(f"{path}: no {conversion!r} column (data.kuairand_conversion); columns are "
                            f"{table.column_names}")  # fmt: skip
        out = {"user_id": table.column("user_id"), "item_id": table.column("video_id"),
               "exposure": pa.array(np.ones(table.num_rows, dtype=np.int8)),
               "click": pa.array(click.astype(np.int8)), conversion: pa.array(later.astype(np.int8))}  # fmt: skip
        if "time_ms" in table.column_names:
            out["timestamp"] = table.column("time_ms")
        out |= {c: table.column(c) for c in table.column_names if c in USER_COLUMNS or c in VIDEO_COLUMNS}
        out |= {c: table.column(c) for c in asked if c in table.column_names and c not in out}
        parts.append(pa.table(out))
        sizes.append((path, table.num_rows))
    table = pa.concat_tables(parts, promote_options="default")
    table = table.append_column("__row", pa.array(np.arange(table.num_rows)))
    for paths, key, side in ((user_files, "user_id", "user_id"), (video_files, "video_id", "item_id")):
        features = _features(paths, key)
        if features is not None:
            features = features.rename_columns([side if c == key else c for c in features.column_names])
            known = USER_COLUMNS if side == "user_id" else VIDEO_COLUMNS
            extra = [c for c in features.column_names if c in known and c not in table.column_names]
            table = table.join(features.select([side, *extra]), keys=side, join_type="left outer")
    # a join reorders rows: put them back in file order, so an error still names the right file and line
    table = table.sort_by("__row").drop_columns(["__row"])
    user_features = tuple(c for c in table.column_names if c in USER_COLUMNS)
    item_features = tuple(c for c in table.column_names if c in VIDEO_COLUMNS)
    stages = ("exposure", "click", conversion)
    context = resolve(context_features, CONTEXT_COLUMNS, table.column_names)
    log = log_from_table(
        table, Concatenated(sizes), stages, user_features=user_features, item_features=item_features,
        context_features=context,
    )  # fmt: skip
    source = "derived from play and duration times" if derived else f"the {conversion} column"
    log.report.notes.append(
        f"KuaiRand: {len(logs)} log file(s); exposure = every row, click = is_click, {conversion} = {source}"
    )
    return log


def kuairand_source(folder: str | Path, conversion: str, test_frac: float, valid_frac: float, seed: int,
                    context_features: tuple[str, ...] | None = None):  # fmt: skip
    """KuaiRand as a cache source: each log read in blocks and joined with the feature files (held whole: one
    row per user or video), split per pair; context_features as in `load_kuairand`."""
    asked = wanted(context_features, CONTEXT_COLUMNS)
    from csmf.data.sources import Source, file_blocks, no_empty, pair_split, pair_split_note, require

    if conversion not in CONVERSIONS:
        raise DataError(f"data.kuairand_conversion: {conversion!r} is not one of {list(CONVERSIONS)}")
    folder = Path(folder)
    logs, user_files, video_files = kuairand_files(folder)

    def blocks():
        joins = []
        for paths, key, side, known in ((user_files, "user_id", "user_id", USER_COLUMNS),
                                        (video_files, "video_id", "item_id", VIDEO_COLUMNS)):  # fmt: skip
            features = _features(paths, key)
            if features is not None:
                features = features.rename_columns([side if c == key else c for c in features.column_names])
                joins.append((side, features.select([side, *(c for c in features.column_names if c in known)])))
        for path in logs:
            for where, table in file_blocks(path):
                require(table, path, ("user_id", "video_id", "is_click"))
                no_empty(table, where, ("user_id", "video_id"))
                click = check_stage(table, "is_click", where)
                if conversion in table.column_names:
                    later = check_stage(table, conversion, where)
                elif conversion == "long_view":
                    later = _long_view(table, path).to_numpy().astype(bool)
                else:
                    raise DataError(f"{path}: no {conversion!r} column (data.kuairand_conversion)")
                users, items = table.column("user_id"), table.column("video_id")
                out = {"user_id": users, "item_id": items,
                       "split": pair_split(users, items, test_frac, valid_frac, seed),
                       "exposure": pa.array(np.ones(table.num_rows, dtype=np.int8)),
                       "click": pa.array(click.astype(np.int8)),
                       conversion: pa.array(later.astype(np.int8))}  # fmt: skip
                out |= {c: table.column(c) for c in table.column_names if c in USER_COLUMNS or c in VIDEO_COLUMNS}
                out |= {c: table.column(c) for c in asked if c in table.column_names and c not in out}
                block = pa.table(out).append_column("__row", pa.array(np.arange(table.num_rows)))
                for side, features in joins:
                    extra = [c for c in features.column_names if c != side and c not in block.column_names]
                    block = block.join(features.select([side, *extra]), keys=side, join_type="left outer")
                yield block.sort_by("__row").drop_columns(["__row"])

    options = {"layout": "kuairand", "conversion": conversion, "test_frac": test_frac, "valid_frac": valid_frac,
               "seed": seed}  # fmt: skip
    return Source(name="kuairand", files=logs + user_files + video_files, options=options,
                  stages=("exposure", "click", conversion), blocks=blocks, context=asked,
                  context_required=context_features is not None,
                  notes=[pair_split_note(f"{len(logs)} KuaiRand log(s)", test_frac, valid_frac)])  # fmt: skip
