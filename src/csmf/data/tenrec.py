"""Tenrec (Yuan et al., NeurIPS 2022 datasets track; Tencent's QQ Kandian / QQ Browser feeds) as its owners
distribute it, mapped onto the cascade.

Files read from a folder: one scenario log, `QK-video.csv`, `QB-video.csv`, `QK-article.csv`,
`QB-article.csv`, or the CTR subset `ctr_data_1M.csv` (`data.tenrec_file` picks one when the folder holds
several). Columns: `user_id`, `item_id`, `click`, the later actions (`follow`, `like`, `share`), and
features (`video_category`, `watching_times`, `gender`, `age`, `hist_1..hist_10` in ctr_data_1M, read as
one bag feature `hist` of the user).
Every row is an impression of an item to a user.

Stages: exposure = every row, click = `click`, then a later action, `like` by default
(`data.tenrec_conversion`: like, follow, share). A like or share needs a click first in Tenrec's
feeds; a row with the action but no click is an error naming its line, never silently re-labelled.
Columns constant within every user (item) become user (item) features; the others are reported unused.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from csmf.data.errors import DataError
from csmf.data.logtable import Locator, check_stage, log_from_table, read_table
from csmf.data.schema import CascadeLog

FILES = ("QK-video.csv", "QB-video.csv", "QK-article.csv", "QB-article.csv", "ctr_data_1M.csv")
CONVERSIONS = ("like", "follow", "share")


def tenrec_file(folder: Path, name: str = "") -> Path:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; give the folder holding the Tenrec csv files")
    if name:
        path = folder / name
        if not path.exists():
            raise DataError(f"{path}: file not found (data.tenrec_file)")
        return path
    present = [folder / n for n in FILES if (folder / n).exists()]
    if not present:
        raise DataError(f"{folder}: no Tenrec log; expected one of {list(FILES)}")
    if len(present) > 1:
        raise DataError(
            f"{folder}: several Tenrec logs ({[p.name for p in present]}); they are different scenarios with "
            "different items: pick one with --set data.tenrec_file=NAME"
        )
    return present[0]


def _as_list(table: pa.Table, columns: list[str]) -> pa.Array:
    """One list per row of the non-empty cells of `columns`."""
    cells = np.stack([table.column(c).to_numpy(zero_copy_only=False).astype(object) for c in columns], axis=1)
    present = np.stack([~np.asarray(pc.is_null(table.column(c))) for c in columns], axis=1)
    offsets = np.r_[0, np.cumsum(present.sum(axis=1))].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(cells[present].astype(str)))


def _rows(table: pa.Table, path: Path, where, conversion: str) -> dict[str, pa.Array]:
    """A block of a Tenrec log as the cascade's columns (exposure, click, the later action, features); the
    checks name the file and line."""
    missing = [c for c in ("user_id", "item_id", "click", conversion) if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {table.column_names}"
                        + (" (pick another stage with --set data.tenrec_conversion=...)" if conversion in missing
                           else ""))  # fmt: skip
    click, later = check_stage(table, "click", where), check_stage(table, conversion, where)
    if (later & ~click).any():
        row = int(np.flatnonzero(later & ~click)[0])
        raise DataError(f"{where(row)}: {conversion} 1 without a click; Tenrec's later actions follow a click")
    history = sorted((c for c in table.column_names if re.fullmatch(r"hist_\d+", c)), key=lambda c: int(c[5:]))
    other = [c for c in table.column_names if c not in ("user_id", "item_id", "click", *CONVERSIONS, *history)]
    out = {"user_id": table.column("user_id"), "item_id": table.column("item_id"),
           "exposure": pa.array(np.ones(table.num_rows, dtype=np.int8)),
           "click": pa.array(click.astype(np.int8)), conversion: pa.array(later.astype(np.int8))}  # fmt: skip
    out |= {c: table.column(c) for c in other}
    if history:  # ctr_data_1M's hist_1..hist_10 (the user's recent items) as one list column: a bag feature
        out["hist"] = _as_list(table, history)
    return out


def load_tenrec(folder: str | Path, conversion: str = "like", name: str = "") -> CascadeLog:
    if conversion not in CONVERSIONS:
        raise DataError(f"data.tenrec_conversion: {conversion!r} is not one of {list(CONVERSIONS)}")
    path = tenrec_file(Path(folder), name)
    where = Locator(path)
    log = log_from_table(pa.table(_rows(read_table(path), path, where, conversion)), where,
                         ("exposure", "click", conversion))  # fmt: skip
    log.report.notes.append(f"Tenrec {path.name}: exposure = every row, click = click, {conversion} = {conversion}")
    return log


def tenrec_source(folder: str | Path, conversion: str, name: str, test_frac: float, valid_frac: float, seed: int):
    """Tenrec as a cache source, read in blocks: the rows and checks of `load_tenrec`, split per pair."""
    from csmf.data.sources import Source, file_blocks, no_empty, pair_split, pair_split_note

    if conversion not in CONVERSIONS:
        raise DataError(f"data.tenrec_conversion: {conversion!r} is not one of {list(CONVERSIONS)}")
    path = tenrec_file(Path(folder), name)

    def blocks():
        for where, table in file_blocks(path):
            out = _rows(table, path, where, conversion)
            no_empty(table, where, ("user_id", "item_id"))
            split = pair_split(out["user_id"], out["item_id"], test_frac, valid_frac, seed)
            yield pa.table({"split": pa.array(split), **out})

    options = {"layout": "tenrec", "conversion": conversion, "test_frac": test_frac, "valid_frac": valid_frac,
               "seed": seed}  # fmt: skip
    return Source(name="tenrec", files=[path], options=options, stages=("exposure", "click", conversion),
                  blocks=blocks, notes=[pair_split_note(path.name, test_frac, valid_frac)])  # fmt: skip
