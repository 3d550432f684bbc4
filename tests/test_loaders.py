"""JD loader (packaged copy, .txt parsing) and the generic CSV / Parquet log loader."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from csmf.data.errors import DataError
from csmf.data.jd import JD_FILES, jd_raw_matrices, packaged_jd_dir, read_pair_file
from csmf.data.logtable import load_log
from csmf.data.schema import LoadReport
from csmf.data.split import split_log

# ----- JD -----------------------------------------------------------------------------------------

# Pair counts of the five published files (SOURCE.md / ATTRIBUTION.md).
JD_PAIRS = {"trn_pv": 217_977, "trn_fav": 7_380, "trn_buy": 60_967, "vld_buy": 5_892, "tst_buy": 5_013}


def test_packaged_jd_matches_shared_files(jd_files, jd_shared_dir):
    shared = jd_raw_matrices(jd_shared_dir)
    assert set(shared) == set(jd_files) == set(JD_FILES)
    for stem in JD_FILES:
        assert shared[stem].shape == jd_files[stem].shape
        assert (shared[stem] != jd_files[stem]).nnz == 0, stem


def test_packaged_jd_shape_and_counts():
    report = LoadReport("jd")
    files = jd_raw_matrices(None, report)
    assert report.rows_read == sum(JD_PAIRS.values()) == 297_229
    assert report.skipped == {}
    assert report.duplicate_pairs == 0  # the published files hold no repeated pair
    for stem, n in JD_PAIRS.items():
        assert files[stem].shape == (10_690, 13_465)  # users 1..10690, items 1..13465
        assert files[stem].nnz == n
        assert files[stem].dtype == np.float32
        assert set(np.unique(files[stem].data).tolist()) == {1.0}


def test_packaged_jd_decompresses_to_the_listed_sha256():
    folder = packaged_jd_dir()
    listed = dict(
        (name, digest)
        for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", (folder / "ATTRIBUTION.md").read_text(), re.M)
    )
    assert set(listed) == {f"{stem}.txt" for stem in JD_FILES}
    for name, digest in listed.items():
        data = lzma.decompress((folder / f"{name}.xz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == digest, name
        assert len(data.splitlines()) == JD_PAIRS[name.removesuffix(".txt")]


@pytest.mark.parametrize(
    ("text", "lineno", "message"),
    [
        ("1 2\n3 x\n", 2, "ids must be integers"),
        ("1 2\n1.5 2\n", 2, "ids must be integers"),
        ("1 2\n\n-1 2\n", 3, "ids must be >= 1"),
        ("1 2\n1 0\n", 2, "ids must be >= 1"),
        ("1 2 3\n", 1, "expected 2 fields 'user_id item_id', got 3"),
        ("1 2\n4\n", 2, "expected 2 fields 'user_id item_id', got 1"),
    ],
)
def test_read_pair_file_errors_name_file_and_line(tmp_path, text, lineno, message):
    path = tmp_path / "trn_pv.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(f"{path}:{lineno}: {message}")):
        read_pair_file(path)


def test_read_pair_file_parses_and_counts_blank_lines():
    users, items, blank = read_pair_file(Path("x.txt"), text="1 2\n\n  \n3 4\r\n10 1\n")
    np.testing.assert_array_equal(users, [0, 2, 9])  # 1-based ids become 0-based indices
    np.testing.assert_array_equal(items, [1, 3, 0])
    assert blank == 2


def write_jd(folder: Path, overrides: dict[str, str] | None = None) -> Path:
    texts = {
        "trn_pv": "1 1\n1 2\n2 3\n\n",
        "trn_fav": "1 2\n",
        "trn_buy": "1 1\n2 3\n2 3\n3 4\n",  # (2, 3) repeated
        "vld_buy": "\n1 3\n",
        "tst_buy": "2 1\n",
    }
    texts.update(overrides or {})
    folder.mkdir(parents=True, exist_ok=True)
    for stem, text in texts.items():
        (folder / f"{stem}.txt").write_text(text)
    return folder


def test_jd_raw_matrices_reports_blank_lines_and_repeats(tmp_path):
    report = LoadReport("jd")
    files = jd_raw_matrices(write_jd(tmp_path / "jd"), report)
    assert files["trn_buy"].shape == (3, 4)  # largest user id 3, largest item id 4
    assert report.rows_read == 3 + 1 + 4 + 1 + 1
    assert report.skipped == {"blank lines in trn_pv.txt": 1, "blank lines in vld_buy.txt": 1}
    assert report.duplicate_pairs == 1
    assert files["trn_buy"].nnz == 3
    assert files["trn_buy"][1, 2] == 1.0


def test_jd_raw_matrices_missing_or_bad_file(tmp_path):
    folder = write_jd(tmp_path / "jd")
    (folder / "tst_buy.txt").unlink()
    with pytest.raises(DataError, match=r"JD file tst_buy\.txt \(or tst_buy\.txt\.xz\) not found in .*jd"):
        jd_raw_matrices(folder)
    folder = write_jd(tmp_path / "jd2", {"trn_fav": "1 2\n2 two\n"})
    with pytest.raises(DataError, match=re.escape(f"{folder / 'trn_fav.txt'}:2: ids must be integers")):
        jd_raw_matrices(folder)
    folder = write_jd(tmp_path / "jd3", {"vld_buy": "\n\n"})
    with pytest.raises(DataError, match=r"vld_buy\.txt has no pairs"):
        jd_raw_matrices(folder)


# ----- generic logs: errors -----------------------------------------------------------------------


def write_csv(tmp_path: Path, text: str, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def write_parquet(tmp_path: Path, columns: dict, name: str = "log.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize(
    ("text", "stages", "where", "message"),
    [
        # Data row 1 (0-based) is line 3: the header is line 1.
        ("user_id,item_id,click\n1,5,1\n1,6,2\n", ("click",), 3, "stage column 'click' has value"),
        ("user_id,item_id,click\n1,5,1\n1,6,1\n2,6,x\n", ("click",), 4, "stage column 'click' has value 'x'"),
        ("user_id,item_id,click\n1,5,1\n1,6,\n", ("click",), 3, "stage column 'click' is empty"),
        ("user_id,item_id,click\n1,5,1\n,6,1\n", (), 3, "column 'user_id' is empty"),
        ("user_id,item_id,click\n1,5,1\n2,6,1\n-3,6,1\n", (), 4, "column 'user_id' has negative id -3"),
        ("user_id,item_id,click\n1,5,x\n", (), 2, "stage column 'click' has value 'x'"),
    ],
)
def test_csv_errors_name_file_line_and_column(tmp_path, text, stages, where, message):
    path = write_csv(tmp_path, text)
    with pytest.raises(DataError, match=re.escape(f"{path}:{where}: {message}")):
        load_log(path, stages=stages)


def test_csv_error_value_is_reported(tmp_path):
    path = write_csv(tmp_path, "user_id,item_id,click\n1,5,1\n1,6,2\n")
    with pytest.raises(DataError, match=r"has value \S*2\)?; stage columns hold 0 or 1"):
        load_log(path, stages=("click",))


@pytest.mark.parametrize(
    ("columns", "stages", "row", "message"),
    [
        ({"user_id": [1, 2, 3], "item_id": [1, 2, 3], "click": [1, 1, 2]}, ("click",), 3, "stage column 'click'"),
        ({"user_id": [1, 2], "item_id": [1, 2], "click": ["1", "x"]}, ("click",), 2, "stage column 'click' has"),
        ({"user_id": [1, 2], "item_id": [1, 2], "click": [1, None]}, ("click",), 2, "stage column 'click' is empty"),
        ({"user_id": ["a", None], "item_id": [1, 2], "click": [1, 1]}, (), 2, "column 'user_id' is empty"),
        ({"user_id": [1, 2], "item_id": [1.0, 1.5], "click": [1, 1]}, (), 2, "column 'item_id' has non-integer"),
        ({"user_id": [1, -2], "item_id": [1, 2], "click": [1, 1]}, (), 2, "column 'user_id' has negative id -2"),
    ],
)
def test_parquet_errors_name_file_row_and_column(tmp_path, columns, stages, row, message):
    path = write_parquet(tmp_path, columns)
    with pytest.raises(DataError, match=re.escape(f"{path} row {row}: {message}")):
        load_log(path, stages=stages)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_file_level_errors_name_file_and_column(tmp_path, fmt):
    def write(columns: dict) -> Path:
        if fmt == "parquet":
            return write_parquet(tmp_path, columns)
        names = list(columns)
        rows = zip(*columns.values(), strict=True)
        return write_csv(tmp_path, ",".join(names) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))

    path = write({"user": [1, 2], "item_id": [1, 2], "click": [1, 1]})
    with pytest.raises(DataError, match=re.escape(f"{path}: missing id column 'user_id'")):
        load_log(path)
    path = write({"user_id": [1, 2], "item_id": [1, 2], "click": [1, 1]})
    with pytest.raises(DataError, match=re.escape(f"{path}: missing stage column(s) ['buy']")):
        load_log(path, stages=("click", "buy"))
    path = write({"user_id": [1, 2], "item_id": [1, 2], "click": [1, 1], "buy": [0, 0]})
    with pytest.raises(DataError, match=re.escape(f"{path}: stage column 'buy' has no positive (1) rows")):
        load_log(path)
    with pytest.raises(DataError, match=re.escape(f"{path}: stage column 'buy' has no positive (1) rows")):
        load_log(path, stages=("click", "buy"))
    path = write({"user_id": [1, 2], "item_id": [1, 2], "price": [3.5, 4.5]})
    with pytest.raises(DataError, match=re.escape(f"{path}") + r".*stage column 'price' has value"):
        load_log(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    path = write_csv(tmp_path, "user_id,item_id,click\n1,2,1\n", name="log.txt")
    with pytest.raises(DataError, match=re.escape(f"{path}: unknown log format '.txt'")):
        load_log(path)
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataError, match=re.escape(f"{missing}: file not found")):
        load_log(missing)
    path = write_csv(tmp_path, "user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: no stage columns")):
        load_log(path)


def test_compressed_csv_and_tsv(tmp_path):
    path = tmp_path / "log.csv.gz"
    path.write_bytes(gzip.compress(b"user_id,item_id,click\n1,2,1\n1,3,7\n"))
    with pytest.raises(DataError, match=re.escape(f"{path}:3: stage column 'click' has value")):
        load_log(path, stages=("click",))
    tsv = write_csv(tmp_path, "user_id\titem_id\tclick\n1\t2\t1\n1\t3\t1\n", name="log.tsv")
    log = load_log(tsv)
    assert log.stages == ("click",)
    assert log.labels.tolist() == [[True], [True]]


def test_csv_error_line_counts_blank_lines(tmp_path):
    # Line 1 header, line 2 data, line 3 blank, line 4 the bad row.
    path = write_csv(tmp_path, "user_id,item_id,click\n1,5,1\n\n1,6,2\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:4: stage column 'click'")):
        load_log(path, stages=("click",))


def test_csv_empty_string_id_is_an_error(tmp_path):
    path = write_csv(tmp_path, "user_id,item_id,click\na,x,1\n,y,1\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: column 'user_id' is empty")):
        load_log(path)


def test_stage_column_before_ids_is_a_data_error(tmp_path):
    path = write_csv(tmp_path, "click,user_id,item_id\n1,5,1\n1,3,1\n")
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_log(path)


# ----- generic logs: what a good file turns into --------------------------------------------------


def test_string_ids_map_to_contiguous_indices_and_round_trip(tmp_path):
    rows = [("bob", "x9", 1), ("amy", "x1", 1), ("bob", "x1", 1), ("cat", "x7", 1), ("amy", "x9", 1)]
    path = write_csv(tmp_path, "user_id,item_id,click\n" + "".join(f"{u},{i},{c}\n" for u, i, c in rows))
    log = load_log(path)
    assert (log.n_users, log.n_items) == (3, 3)
    assert log.user_ids.tolist() == ["bob", "amy", "cat"]  # first-appearance order
    assert log.item_ids.tolist() == ["x9", "x1", "x7"]
    assert log.users.dtype == np.int32 and log.items.dtype == np.int32
    assert set(log.users.tolist()) == {0, 1, 2} and set(log.items.tolist()) == {0, 1, 2}
    pairs = {(log.user_ids[u], log.item_ids[i]) for u, i in zip(log.users, log.items, strict=True)}
    assert pairs == {(u, i) for u, i, _ in rows}


def test_integer_ids_keep_their_values_in_the_maps(tmp_path):
    path = write_parquet(tmp_path, {"user_id": [100, 7, 100], "item_id": [3, 3, 50], "click": [1, 1, 1]})
    log = load_log(path)
    assert log.user_ids.tolist() == [100, 7]
    assert log.item_ids.tolist() == [3, 50]
    pairs = {(int(log.user_ids[u]), int(log.item_ids[i])) for u, i in zip(log.users, log.items, strict=True)}
    assert pairs == {(100, 3), (7, 3), (100, 50)}


def test_duplicates_are_merged_and_all_zero_rows_skipped(tmp_path):
    text = (
        "user_id,item_id,click,buy,timestamp\n"
        "u1,i1,1,0,10\n"
        "u1,i1,0,1,30\n"  # same pair: labels OR-ed, latest timestamp kept
        "u1,i1,1,0,20\n"  # third row of the same pair
        "u1,i2,0,0,40\n"  # no positive stage: skipped
        "u2,i2,1,0,50\n"
        "u2,i2,0,0,60\n"  # a skipped row is not a duplicate either
    )
    log = load_log(write_csv(tmp_path, text))
    assert log.stages == ("click", "buy")
    assert log.report.rows_read == 6
    assert log.report.duplicate_pairs == 2
    assert log.report.skipped == {"rows with every stage 0 (no positive for any objective)": 2}
    got = {
        (log.user_ids[u], log.item_ids[i]): (lab.tolist(), t)
        for u, i, lab, t in zip(log.users, log.items, log.labels, log.timestamps, strict=True)
    }
    assert got == {("u1", "i1"): ([True, True], 30.0), ("u2", "i2"): ([True, False], 50.0)}
    assert "skipped 2 rows" in log.report.render()


def test_stage_inference_stops_at_the_first_non_binary_column(tmp_path):
    path = write_parquet(
        tmp_path,
        {
            "user_id": [1, 1, 2, 2],
            "item_id": [1, 2, 1, 3],
            "click": [1, 1, 1, 0],
            "cart": [0, 1, 0, 0],
            "buy": [True, False, False, False],
            "price": [9.5, 3.0, 9.5, 1.0],  # not 0/1: inference stops here
            "is_new": [0, 1, 0, 0],  # 0/1, but after `price`: not a stage
        },
    )
    log = load_log(path)
    assert log.stages == ("click", "cart", "buy")
    assert log.labels.sum(axis=0).tolist() == [3, 1, 1]
    note = next(n for n in log.report.notes if n.startswith("stages inferred"))
    assert "'click', 'cart', 'buy'" in note and "ended by 'price', which is not 0/1" in note and "--stages" in note


def test_explicit_stages_set_the_order_and_may_skip_columns(tmp_path):
    path = write_parquet(
        tmp_path,
        {"user_id": [1, 1, 2], "item_id": [1, 2, 1], "click": [1, 1, 1], "buy": [0, 1, 0], "fav": [1, 0, 0]},
    )
    log = load_log(path, stages=("fav", "buy"))
    assert log.stages == ("fav", "buy")
    # Rows: (1,1) fav; (1,2) buy; (2,1) neither -> skipped.
    labels = {
        (int(log.user_ids[u]), int(log.item_ids[i])): lab.tolist()
        for u, i, lab in zip(log.users, log.items, log.labels, strict=True)
    }
    assert labels == {(1, 1): [True, False], (1, 2): [False, True]}
    assert sum(log.report.skipped.values()) == 1
    # An unlisted column is a candidate feature: `click` (all 1) is constant per user.
    assert "click" in log.user_features


def test_feature_inference(tmp_path):
    path = write_parquet(
        tmp_path,
        {
            "user_id": ["a", "a", "b", "b", "c"],
            "item_id": [1, 2, 1, 3, 2],
            "click": [1, 1, 1, 1, 1],
            "timestamp": [1, 2, 3, 4, 5],
            "age": [30, 30, 41, 41, 25],  # constant per user
            "brand": ["n", "m", "n", "k", "m"],  # constant per item, not per user
            "price": [1.0, 2.0, 3.0, 4.0, 5.0],  # varies within user and within item
        },
    )
    log = load_log(path)
    assert log.stages == ("click",)
    assert set(log.user_features) == {"age"}
    assert set(log.item_features) == {"brand"}
    assert log.user_features["age"].tolist() == [30.0, 41.0, 25.0]  # users a, b, c
    brand = log.item_features["brand"]  # category codes, one per item 1, 2, 3
    assert brand[0] != brand[1] != brand[2] and brand[0] != brand[2]
    assert any("'price' is not used" in note for note in log.report.notes)
    assert log.timestamps is not None


def test_explicit_features(tmp_path):
    columns = {
        "user_id": [1, 1, 2],
        "item_id": [1, 2, 1],
        "click": [1, 1, 1],
        "seg": [5, 5, 6],
        "cat": [0, 1, 0],
    }
    path = write_parquet(tmp_path, columns)
    log = load_log(path, user_features=(), item_features=("cat",))
    assert log.user_features == {}
    assert log.item_features["cat"].tolist() == [0.0, 1.0]
    assert any("'seg' is not used" in note for note in log.report.notes)
    with pytest.raises(DataError, match=re.escape(f"{path}: user feature 'cat' takes different values")):
        load_log(path, user_features=("cat",))
    with pytest.raises(DataError, match=re.escape(f"{path}: item feature column 'color' not found")):
        load_log(path, item_features=("color",))


def test_csv_and_parquet_give_the_same_log(tmp_path):
    columns = {
        "user_id": [3, 1, 3, 2, 1],
        "item_id": [10, 11, 11, 10, 10],
        "click": [1, 1, 0, 1, 1],
        "buy": [0, 1, 1, 0, 0],
        "timestamp": [5, 4, 3, 2, 1],
    }
    a = load_log(write_parquet(tmp_path, columns))
    b = load_log(
        write_csv(
            tmp_path,
            "user_id,item_id,click,buy,timestamp\n"
            + "".join(",".join(str(v[k]) for v in columns.values()) + "\n" for k in range(5)),
        )
    )
    for field in ("users", "items", "labels", "timestamps", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.stages == b.stages == ("click", "buy")


def test_cold_test_users_counted_after_split(tmp_path):
    # User "solo" has one row: users with fewer than 2 rows keep all of them in train.
    text = "user_id,item_id,click\nsolo,1,1\n" + "".join(f"u{u},{i},1\n" for u in range(5) for i in range(5))
    log = load_log(write_csv(tmp_path, text))
    data = split_log(log, test_frac=0.2, seed=0)
    assert data.report.cold_test_users == {"click": 0}
    solo = log.user_ids.tolist().index("solo")
    assert data.train["click"][solo].nnz == 1
    assert data.test["click"][solo].nnz == 0
    assert np.diff(data.test["click"].indptr).tolist() == [0] + [1] * 5


# ----- damaged files: a clear error with the line, never a stage silently dropped --------------------

STAGED = "user_id,item_id,view,cart,buy\n" + "".join(
    f"{u},{i},1,{(u + i) % 2},{(u * i) % 2}\n" for u in range(1, 6) for i in range(1, 5)
)


@pytest.mark.parametrize("bad", ["2", "yes", ""])
@pytest.mark.parametrize("column", [3, 4])  # cart or buy: a stage column after the first
def test_a_damaged_later_stage_column_is_an_error_not_a_dropped_stage(tmp_path, bad, column):
    lines = STAGED.splitlines()
    cells = lines[7].split(",")
    cells[column] = bad
    lines[7] = ",".join(cells)  # data row 7 is line 8
    path = write_csv(tmp_path, "\n".join(lines) + "\n")
    name = ("cart", "buy")[column - 3]
    expected = {"2": "has value 2", "yes": "has value 'yes'", "": "is empty"}[bad]  # 2 stays a number
    with pytest.raises(DataError, match=re.escape(f"{path}:8: stage column {name!r} {expected}")) as err:
        load_log(path)
    assert "--stages" in str(err.value) and "cells are 0 or 1" in str(err.value)


def test_a_damaged_stage_cell_in_parquet_names_the_row(tmp_path):
    buy = [1, 0, 1, 0, 2, 0]  # one 2 at row 5
    path = write_parquet(tmp_path, {"user_id": [1, 1, 2, 2, 3, 3], "item_id": [1, 2, 1, 3, 2, 3],
                                    "view": [1] * 6, "buy": buy})  # fmt: skip
    with pytest.raises(DataError, match=re.escape(f"{path} row 5: stage column 'buy' has value 2")):
        load_log(path)


def test_a_feature_column_that_is_mostly_not_binary_ends_the_stages_and_the_report_says_why(tmp_path):
    path = write_csv(tmp_path, "user_id,item_id,view,buy,age\n1,1,1,0,31\n1,2,1,1,31\n2,1,1,1,1\n")
    log = load_log(path)
    assert log.stages == ("view", "buy")
    note = next(n for n in log.report.notes if n.startswith("stages inferred"))
    assert "'view', 'buy'" in note and "ended by 'age', which is not 0/1" in note


def test_a_binary_feature_after_the_stages_is_reported_as_a_stage_and_stages_opt_out(tmp_path):
    path = write_csv(tmp_path, "user_id,item_id,view,buy,is_new\n1,1,1,0,1\n1,2,1,1,0\n2,1,1,1,1\n")
    assert load_log(path).stages == ("view", "buy", "is_new")  # what inference can see: said in the report
    assert "up to the last column" in next(n for n in load_log(path).report.notes if n.startswith("stages"))
    assert load_log(path, stages=("view", "buy")).stages == ("view", "buy")


def test_text_stage_cells_read_as_binary(tmp_path):
    path = write_csv(tmp_path, "user_id,item_id,view,buy\n1,1,1,TRUE\n1,2,1,0\n2,1,1,1\n")
    log = load_log(path)
    assert log.stages == ("view", "buy") and log.labels[:, 1].sum() == 2


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("user_id,item_id,view\n1,2,1\n3,4\n5,6,1\n", 3, "expected 3 columns (as in the header), got 2: '3,4'"),
        ("user_id,item_id,view\n1,2,1\n5,6,1\n3,4,1,1\n", 4, "expected 3 columns (as in the header), got 4"),
        ('user_id,item_id,view\n1,2,1\n"3,4,1\n5,6,1\n', 3, "a quote that is never closed"),
    ],
)
def test_csv_shape_errors_name_the_line(tmp_path, text, line, message):
    path = write_csv(tmp_path, text)
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: ") + ".*" + re.escape(message)):
        load_log(path)


@pytest.mark.parametrize("huge", ["99999999999999999999999", "1e300", "inf"])
def test_an_id_too_large_for_a_number_is_kept_exactly_as_text_in_csv_and_named_in_parquet(tmp_path, huge):
    # a CSV's text is kept as written (no float rounding can merge two ids); a Parquet float column is a number
    log = load_log(write_csv(tmp_path, f"user_id,item_id,view\n1,2,1\n{huge},3,1\n"))
    assert log.user_ids.tolist() == ["1", huge]
    assert "'user_id' read as text" in next(n for n in log.report.notes if n.startswith("ids:"))
    path = write_parquet(tmp_path, {"user_id": [1.0, float(huge)], "item_id": [2, 3], "view": [1, 1]})
    with pytest.raises(DataError, match=re.escape(f"{path} row 2: column 'user_id' has id") + ".*too large"):
        load_log(path)


def test_jd_ids_beyond_int64_name_the_line(tmp_path):
    folder = write_jd(tmp_path / "jd", {"trn_fav": "1 2\n1 99999999999999999999999\n"})
    with pytest.raises(DataError, match=re.escape(f"{folder / 'trn_fav.txt'}:2: ids must be at most")):
        jd_raw_matrices(folder)


def test_a_stray_huge_jd_id_is_remapped_not_a_catalogue_of_millions(tmp_path):
    from csmf.data.jd import jd_raw

    report = LoadReport("jd")
    folder = write_jd(tmp_path / "jd", {"trn_pv": "1 1\n1 2\n2 3\n2 5000000\n"})
    files, user_ids, item_ids = jd_raw(folder, report)
    assert files["trn_pv"].shape == (3, 5) and item_ids.tolist() == [1, 2, 3, 4, 5000000]
    assert user_ids.tolist() == [1, 2, 3]  # dense: kept as they are
    assert files["trn_pv"][1, 4] == 1.0  # (user 2, item 5000000)
    assert any("item ids go up to 5,000,000 but only 5 are used" in n for n in report.notes)
    files, user_ids, _ = jd_raw(write_jd(tmp_path / "jd2", {"trn_buy": "1 1\n2 3\n2147483648 4\n"}))
    assert files["trn_buy"].shape == (3, 4) and user_ids.tolist() == [1, 2, 2147483648]  # >= 2^31: remapped


# ----- repeated header names, id text, damaged stage values, compressed files misnamed -------------


@pytest.mark.parametrize(
    ("header", "name", "positions"),
    [
        ("user_id,item_id,click,click,purchase", "click", "columns 3 and 4"),
        ("user_id,user_id,click,purchase,view", "user_id", "columns 1 and 2"),  # not "missing item_id"
    ],
)
def test_a_repeated_column_name_is_named_with_its_positions(tmp_path, header, name, positions):
    path = write_csv(tmp_path, header + "\n1,2,1,1,0\n2,3,1,0,1\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: column name {name!r} appears 2 times in the header "
                                                  f"({positions}); rename them")):  # fmt: skip
        load_log(path)
    table = pa.Table.from_arrays([pa.array([1, 2])] * 5, names=header.split(","))
    pq.write_table(table, tmp_path / "log.parquet")
    with pytest.raises(DataError, match=re.escape(f"appears 2 times in the schema ({positions})")):
        load_log(tmp_path / "log.parquet")


def test_an_id_with_leading_zeros_keeps_its_identity_whatever_the_other_rows_hold(tmp_path):
    rows = "user_id,item_id,click\n1,007,1\n1,0007,1\n2,7,1\n"
    numeric = load_log(write_csv(tmp_path, rows, "numeric.csv"))
    mixed = load_log(write_csv(tmp_path, rows + "3,abc,1\n", "mixed.csv"))  # one unrelated non-numeric id
    assert numeric.item_ids.tolist() == ["007", "0007", "7"]  # three ids, not one
    assert mixed.item_ids.tolist() == ["007", "0007", "7", "abc"]
    assert numeric.user_ids.tolist() == [1, 2] and numeric.user_ids.dtype == np.int64  # plain integers: numbers
    ids = next(n for n in numeric.report.notes if n.startswith("ids:"))
    assert "'user_id' read as integers" in ids and "'item_id' read as text: data row 1 holds '007'" in ids
    for text in ("1,1.5,1", "1,-0,1", "1, 5,1"):  # not one plain integer: the column is text as written
        log = load_log(write_csv(tmp_path, f"user_id,item_id,click\n1,5,1\n{text}\n"))
        assert log.item_ids.tolist() == ["5", text.split(",")[1]]


def test_a_cache_keeps_ids_with_leading_zeros_apart(tmp_path):
    from csmf.data.cache import ensure_cache
    from csmf.data.sources import log_source

    path = write_csv(tmp_path, "user_id,item_id,click\n1,007,1\n1,7,1\n2,0007,1\n2,7,1\n")
    source = log_source(path, ("click",), "user_id", "item_id", 0.2, 0.1, 0, "log")
    cache = ensure_cache(source, tmp_path / "cache", log=lambda _m: None)
    assert sorted(cache.ids("item").tolist()) == ["0007", "007", "7"]
    assert any("kept as written" in n for n in cache.manifest["notes"])


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_stage_column_of_halves_is_refused_not_a_shorter_cascade(tmp_path, fmt):
    columns = {"user_id": [1, 1, 2, 2], "item_id": [1, 2, 1, 3], "click": [1, 1, 1, 1], "buy": [0.5, 1.5, 0.5, 1.5]}
    if fmt == "parquet":
        path, where = write_parquet(tmp_path, columns), "row 1"
    else:
        rows = zip(*columns.values(), strict=True)
        path = write_csv(tmp_path, "user_id,item_id,click,buy\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
        where = ":2"
    with pytest.raises(DataError, match=re.escape(f"{path}{' ' if fmt == 'parquet' else ''}{where}: stage column "
                                                  "'buy' has value 0.5")) as err:  # fmt: skip
        load_log(path)
    assert "--stages" in str(err.value)
    assert load_log(path, stages=("click",)).stages == ("click",)  # named: the halves are a feature
    rate = write_parquet(tmp_path, {**columns, "buy": [0.25, 0.5, 0.75, 0.1]}, "rate.parquet")  # a rate: a feature
    assert load_log(rate).stages == ("click",)


def test_gzip_bytes_named_csv_are_one_clear_error_without_a_printed_traceback(tmp_path, capfd):
    rows = "user_id,item_id,click\n" + "".join(f"{u},{u % 13},1\n" for u in range(3000))
    path = tmp_path / "log.csv"
    path.write_bytes(gzip.compress(rows.encode()))
    with pytest.raises(DataError, match=re.escape(f"{path}: the file is gzip-compressed but named .csv; rename "
                                                  "it to log.csv.gz")):  # fmt: skip
        load_log(path)
    path.write_bytes(b"user_id,item_id,click\n1,2,1\n" + bytes(range(128, 256)) * 30)  # binary, not compressed
    with pytest.raises(DataError, match=re.escape(f"{path}: not UTF-8 text")):
        load_log(path)
    assert "Exception ignored" not in capfd.readouterr().err
