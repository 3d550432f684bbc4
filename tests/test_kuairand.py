"""The KuaiRand loader: the owners' file layout (logs + user and video feature files), the joined sample in
../shared, the cascade it maps to, and errors that name the file and line even across several logs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from csmf.cli import main
from csmf.data.errors import DataError
from csmf.data.kuairand import load_kuairand

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "kuairand-sample"


def write_layout(folder: Path, bad_click: str | None = None) -> Path:
    """Two standard logs, a random log, user features and video features, as KuaiRand names them."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    header = "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab"  # noqa: E501
    names = [
        "log_standard_4_08_to_4_21_pure.csv",
        "log_standard_4_22_to_5_08_pure.csv",
        "log_random_4_22_to_5_08_pure.csv",
    ]  # noqa: E501
    for n, name in enumerate(names):
        lines = [header]
        for r in range(40):
            user, video = int(rng.integers(0, 12)), int(rng.integers(100, 120))
            click = int(rng.random() < 0.4)
            like, long_view = int(click and rng.random() < 0.5), int(click and rng.random() < 0.7)
            cells = [user, video, 20220408, 1200, 1649400000000 + r, click, like, 0, 0, 0, 0, long_view, 5000, 20000,
                     0, 0, 0, int(n == 2), 1]  # fmt: skip
            lines.append(",".join(map(str, cells)))
        if bad_click is not None and n == 1:
            cells = lines[5].split(",")
            cells[5] = bad_click
            lines[5] = ",".join(cells)  # the second log's line 6 (the header is line 1)
        (folder / name).write_text("\n".join(lines) + "\n")
    users = ["user_id,user_active_degree,is_lowactive_period,follow_user_num,onehot_feat0"]
    users += [f"{u},{u % 3},{u % 2},{10 * u},{u % 4}" for u in range(12)]
    (folder / "user_features_pure.csv").write_text("\n".join(users) + "\n")
    videos = ["video_id,author_id,video_type,upload_type,video_duration,tag"]
    videos += [f"{v},{v % 5},NORMAL,ShortImport,{1000 * (v % 7)},{v % 3}" for v in range(100, 120)]
    (folder / "video_features_basic_pure.csv").write_text("\n".join(videos) + "\n")
    return folder


def test_the_owners_layout_maps_onto_exposure_click_conversion(tmp_path):
    log = load_kuairand(write_layout(tmp_path / "kr"))
    assert log.stages == ("exposure", "click", "long_view")
    assert log.report.rows_read == 120 and sum(log.report.skipped.values()) == 0
    assert set(log.user_features) == {"user_active_degree", "is_lowactive_period", "follow_user_num", "onehot_feat0"}
    assert set(log.item_features) == {"author_id", "video_type", "upload_type", "video_duration", "tag"}
    assert log.labels[:, 0].all() and log.labels[:, 1].sum() > 0 and log.labels[:, 2].sum() > 0
    assert "3 log file(s)" in log.report.notes[-1] and "the long_view column" in log.report.notes[-1]
    assert load_kuairand(tmp_path / "kr", "is_like").stages == ("exposure", "click", "is_like")


def test_a_bad_cell_in_the_second_log_names_that_file_and_line(tmp_path):
    folder = write_layout(tmp_path / "kr", bad_click="yes")
    expected = f"{folder / 'log_standard_4_22_to_5_08_pure.csv'}:6: stage column 'is_click' has value 'yes'"
    with pytest.raises(DataError, match=re.escape(expected)):
        load_kuairand(folder)


def test_missing_files_and_columns_are_named(tmp_path):
    with pytest.raises(DataError, match="no KuaiRand logs; expected log_standard_"):
        load_kuairand(tmp_path)
    (tmp_path / "log_standard_x.csv").write_text("user_id,video_id\n1,2\n")
    missing = f"{tmp_path / 'log_standard_x.csv'}: missing column(s) ['is_click']"
    with pytest.raises(DataError, match=re.escape(missing)):
        load_kuairand(tmp_path)


def test_bench_runs_on_the_owners_layout(tmp_path):
    folder = write_layout(tmp_path / "kr")
    argv = ["bench", "--dataset", "kuairand", "--data-dir", str(folder), "--models", "popularity,csmf",
            "--no-tune", "--out", str(tmp_path / "out"), "--set", "train.max_epochs=1", "--set", "model.dim=8",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "kuairand" / "csmf.json").read_text())
    assert set(result["metrics"]) == {"exposure", "click", "long_view"}


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared/data/kuairand-sample is not here (a fresh clone)")
def test_the_joined_sample_derives_long_view():
    log = load_kuairand(SAMPLE)
    assert log.report.rows_read == 200 and log.n_users == 145 and log.n_items == 29
    assert log.labels[:, 1].sum() == 32  # is_click rate 0.16 over 200 exposures (SOURCE.md)
    assert "derived from play and duration times" in log.report.notes[-1]
    assert {"video_type", "server_width"} <= set(log.item_features) and "user_active_degree" in log.user_features
