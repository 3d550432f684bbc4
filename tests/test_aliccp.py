"""The Ali-CCP processed-CSV loader: the release's own train / val / test files as the split, the leak rule
on held-out pairs, and errors that name the file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from csmf.cli import main
from csmf.data.aliccp import load_aliccp
from csmf.data.errors import DataError
from csmf.data.schema import leak_violations

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ali-ccp-sample"
HEADER = "click,purchase,101,121,122,205,206,301,D109_14"


def write_layout(folder: Path, rows: int = 150, break_line: int | None = None) -> Path:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        lines = [HEADER]
        for _ in range(rows if split == "train" else rows // 3):
            user, item = int(rng.integers(0, 25)), int(rng.integers(0, 40))
            click = int(rng.random() < 0.3)
            buy = int(click and rng.random() < 0.3)
            lines.append(f"{click},{buy},{user},{user % 3},{user % 5},{item},{item % 4},{int(rng.integers(3))},0.5")
        if break_line is not None and split == "val":
            lines[break_line - 1] = f"0,1,{lines[break_line - 1].split(',', 2)[2]}"  # a purchase without a click
        (folder / f"ali_ccp_{split}.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_the_release_files_are_the_split_and_held_out_pairs_are_new(tmp_path):
    data = load_aliccp(write_layout(tmp_path / "ccp"))
    assert data.stages == ("exposure", "click", "purchase") and leak_violations(data) == []
    assert data.report.rows_read == 150 + 50 + 50
    assert any("also training pairs" in reason for reason in data.report.skipped)
    assert {"121", "122"} <= set(data.user_features) and "206" in data.item_features


def test_a_purchase_without_a_click_names_file_and_line(tmp_path):
    folder = write_layout(tmp_path / "ccp", break_line=7)
    with pytest.raises(DataError, match=re.escape(f"{folder / 'ali_ccp_val.csv'}:7: purchase 1 without a click")):
        load_aliccp(folder)


def test_a_missing_split_file_is_named(tmp_path):
    folder = write_layout(tmp_path / "ccp")
    (folder / "ali_ccp_test.csv").unlink()
    with pytest.raises(DataError, match=r"no Ali-CCP test file; expected ali_ccp_test\.csv"):
        load_aliccp(folder)


def test_bench_runs_on_the_processed_layout(tmp_path):
    folder = write_layout(tmp_path / "ccp")
    argv = ["bench", "--dataset", "aliccp", "--data-dir", str(folder), "--models", "popularity,csmf",
            "--no-tune", "--out", str(tmp_path / "out"), "--set", "train.max_epochs=1", "--set", "model.dim=8",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "aliccp" / "csmf.json").read_text())
    assert set(result["metrics"]) <= {"exposure", "click", "purchase"} and "exposure" in result["metrics"]


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared/data/ali-ccp-sample is not here (a fresh clone)")
def test_the_shared_sample_loads():
    data = load_aliccp(SAMPLE)
    assert data.report.rows_read == 200 and leak_violations(data) == []
    assert data.n_users == 1  # SOURCE.md: one user; a schema fixture, not a benchmark
