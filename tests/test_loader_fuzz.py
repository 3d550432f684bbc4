"""Randomly damaged logs: the generic loader either loads every row or names the file and line/row.

Never a traceback (an exception other than DataError), and never a clean load that lost a stage or a
row: a clean load's counts add up to the records in the file (read independently with Python's csv).
"""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from csmf.data.errors import DataError
from csmf.data.logtable import load_log

STAGES = ("view", "cart", "buy")
HEADER = ["user_id", "item_id", *STAGES, "price"]
JUNK = ["", "yes", "2", "-1", "0.5", "1e400", "99999999999999999999999", "NaN", "inf", "-0", "1_0", "x y",
        '"', "１", "TRUE", " 1", "1.0", "0"]  # fmt: skip
FILES = 240  # CSV and Parquet together (the issue asks for at least 200)


def base_rows(rng: np.random.Generator) -> list[list[str]]:
    rows = []
    for _ in range(40):
        user, item = int(rng.integers(1, 9)), int(rng.integers(1, 11))
        cart = int(rng.random() < 0.5)
        rows.append([str(user), str(item), "1", str(cart), str(cart * int(rng.random() < 0.5)), f"{item * 1.5}"])
    return rows


def damage_csv(rows: list[list[str]], rng: np.random.Generator) -> str:
    rows = [list(r) for r in rows]
    for _ in range(int(rng.integers(1, 4))):
        r = int(rng.integers(len(rows)))
        kind = int(rng.integers(7))
        if kind == 0:  # a flipped cell anywhere
            rows[r][int(rng.integers(len(rows[r])))] = str(rng.choice(JUNK))
        elif kind == 1 and len(rows[r]) > 1:  # a short row
            del rows[r][int(rng.integers(len(rows[r])))]
        elif kind == 2:  # a long row
            rows[r].append("1")
        elif kind == 3:  # a huge id
            rows[r][int(rng.integers(2))] = str(int(rng.choice([2**31, 2**53 + 1, 2**63, 10**30])))
        elif kind == 4:  # a stage cell flipped to another 0/1 value (a clean, different log)
            rows[r][2 + int(rng.integers(3))] = str(int(rng.integers(2)))
        elif kind == 5:  # a repeated row
            rows.insert(r, list(rows[r]))
        else:  # a blank line
            rows.insert(r, [])
    text = ",".join(HEADER) + "\n" + "".join(",".join(r) + "\n" for r in rows)
    if rng.random() < 0.2:  # cut off mid-row
        text = text[: int(rng.integers(len(text) // 2, len(text)))]
    return text


def damage_parquet(rows: list[list[str]], rng: np.random.Generator) -> dict[str, pa.Array]:
    columns = {name: [r[j] for r in rows] for j, name in enumerate(HEADER)}
    typed = {c: [int(v) for v in columns[c]] for c in ("user_id", "item_id", *STAGES)}
    typed["price"] = [float(v) for v in columns["price"]]
    for _ in range(int(rng.integers(1, 3))):
        col = str(rng.choice(HEADER))
        r = int(rng.integers(len(rows)))
        kind = int(rng.integers(4))
        if kind == 0:
            typed[col][r] = None
        elif kind == 1:
            typed[col][r] = int(rng.choice([2, -1, 7]))
        elif kind == 2:
            typed[col] = [str(v) for v in typed[col]]
            typed[col][r] = str(rng.choice(JUNK))
        else:
            typed[col] = [float(v) if v is not None else None for v in typed[col]]
            typed[col][r] = float(rng.choice([1e300, 0.5, float("inf"), 2.0**60]))
    return {c: pa.array(v) for c, v in typed.items()}


def records(text: str) -> int:
    """Data records in a CSV text, by Python's csv module (blank lines are not records)."""
    return sum(1 for rec in csv.reader(io.StringIO(text)) if rec) - 1


def check(path, expected_rows: int | None) -> str:
    try:
        log = load_log(path)
    except DataError as err:
        message = str(err)
        assert message.startswith(str(path)), message
        assert re.match(re.escape(str(path)) + r"(:\d+| row \d+): ", message), f"no line or row: {message}"
        return "error"
    # a clean load: every stage, and every record accounted for
    assert log.stages == STAGES, (path, log.stages, log.report.notes)
    report = log.report
    if expected_rows is not None:
        assert report.rows_read == expected_rows, (path, report.rows_read, expected_rows)
    assert sum(report.skipped.values()) + report.duplicate_pairs + len(log.users) == report.rows_read
    return "clean"


@pytest.mark.parametrize("chunk", range(4))
def test_randomly_damaged_logs_load_cleanly_or_name_file_and_line(tmp_path, chunk):
    rng = np.random.default_rng(1000 + chunk)
    outcomes = {"error": 0, "clean": 0}
    for n in range(FILES // 4):
        rows = base_rows(rng)
        if n % 4 == 3:
            path = tmp_path / f"damaged-{n}.parquet"
            pq.write_table(pa.table(damage_parquet(rows, rng)), path)
            outcomes[check(path, len(rows))] += 1
        else:
            text = damage_csv(rows, rng)
            path = tmp_path / f"damaged-{n}.csv"
            path.write_text(text)
            try:
                expected = records(text)
            except csv.Error:
                expected = None
            outcomes[check(path, expected)] += 1
    assert outcomes["error"] > 5 and outcomes["clean"] > 5, outcomes  # both paths really exercised
