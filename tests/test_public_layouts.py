"""Every public-dataset loader on files the simulator writes in that dataset's own layout (so CI tests each
loader without the real data): the cascade it maps to keeps every simulated positive, `csmf bench` runs end
to end under the dataset's stage names, and damaged files fail naming the file, the line and the field."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from csmf.cli import main
from csmf.config import SimConfig
from csmf.data.aliccp import load_aliccp
from csmf.data.aliexpress import load_aliexpress
from csmf.data.errors import DataError
from csmf.data.kuairand import load_kuairand
from csmf.data.schema import leak_violations, union
from csmf.data.simulate import simulate_chunks, simulate_layout
from csmf.data.tenrec import load_tenrec

SIM = SimConfig(n_users=240, n_items=150, chunk_users=80, item_features=2)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STAGE_NAMES = {
    "aliccp": ("exposure", "click", "purchase"),
    "aliccp-raw": ("exposure", "click", "purchase"),
    "aliexpress": ("exposure", "click", "conversion"),
    "kuairand": ("exposure", "click", "long_view"),
    "tenrec": ("exposure", "click", "like"),
}


@pytest.fixture(scope="module")
def truth() -> pa.Table:
    return pa.concat_tables(simulate_chunks(SIM))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    for layout in STAGE_NAMES:
        counts = simulate_layout(SIM, layout, root / layout, progress=False)
        assert counts["files"] and all(p.exists() for p in counts["files"])
    return {layout: root / layout for layout in STAGE_NAMES}


def load(layout: str, folder: Path):
    if layout in ("aliccp", "aliccp-raw"):
        return load_aliccp(folder)
    if layout == "aliexpress":
        return load_aliexpress(folder)
    if layout == "kuairand":
        return load_kuairand(folder)
    return load_tenrec(folder)


def distinct_pairs(table: pa.Table, stage: str) -> int:
    on = np.asarray(table.column(stage)).astype(bool)
    users, items = np.asarray(table.column("user_id"))[on], np.asarray(table.column("item_id"))[on]
    key = users.astype(np.int64) * SIM.n_items + items
    return len(np.unique(key))


@pytest.mark.parametrize("layout", ["aliccp", "aliccp-raw", "kuairand", "tenrec"])
def test_each_layout_loads_every_simulated_positive(layout, layouts, truth):
    log = load(layout, layouts[layout])
    assert log.stages == STAGE_NAMES[layout]
    assert log.report.rows_read == truth.num_rows
    for ours, theirs in zip(log.stages, ("exposure", "click", "conversion"), strict=True):
        if hasattr(log, "labels"):  # a log before its split
            got = int(log.labels[:, log.stages.index(ours)].sum())
        else:  # the release's files are the split: every pair is in train, validation or test
            got = union(log.train[ours], log.valid[ours], log.test[ours]).nnz
        assert got == distinct_pairs(truth, theirs), ours
    if not hasattr(log, "labels"):
        assert leak_violations(log) == []


def test_aliexpress_items_are_their_item_side_categories(layouts, truth):
    data = load_aliexpress(layouts["aliexpress"])
    # the simulator writes the item id in base-32 digits into categorical_10..16: the tuple is the item exactly
    assert data.n_items == len(np.unique(np.asarray(truth.column("item_id"))))
    assert "categorical_9" not in data.user_features and any(c.startswith("categorical_") for c in data.user_features)
    assert leak_violations(data) == []
    assert any("item = the tuple of" in note for note in data.report.notes)


@pytest.mark.parametrize("layout", list(STAGE_NAMES))
def test_bench_runs_on_each_layout_under_its_stage_names(layout, layouts, tmp_path):
    name = "aliccp" if layout.startswith("aliccp") else layout
    argv = ["bench", "--dataset", name, "--data-dir", str(layouts[layout]), "--models", "popularity,csmf",
            "--no-tune", "--out", str(tmp_path), "--set", "train.max_epochs=1", "--set", "model.dim=8",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / name / "csmf.json").read_text())
    assert set(result["metrics"]) == set(STAGE_NAMES[layout])


def test_layout_files_appear_only_when_complete(tmp_path):
    from csmf.data.layouts import write_layout

    def broken():
        yield from simulate_chunks(replace(SIM, n_users=80))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_layout(broken(), "tenrec", tmp_path / "t", seed=0)
    assert list((tmp_path / "t").iterdir()) == []


# ---- damaged raw Ali-CCP files: the file, the line and the field are named ----


def damage(folder: Path, name: str, line: int, edit) -> Path:
    path = folder / name
    lines = path.read_text().split("\n")
    lines[line - 1] = edit(lines[line - 1])
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def raw(layouts, tmp_path) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    for f in layouts["aliccp-raw"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_raw_malformed_entry_names_file_line_and_entry(raw):
    path = damage(raw, "sample_skeleton_train.csv", 7, lambda s: s.replace("\x03", "", 1))
    with pytest.raises(DataError, match=re.escape(f"{path}:7: feature_list entry 1 ")):
        load_aliccp(raw)


def test_raw_feature_count_mismatch_is_named(raw):
    path = damage(raw, "sample_skeleton_test.csv", 3, lambda s: re.sub(r",(\d+),(\d+\x02)", r",9,\2", s, count=1))
    with pytest.raises(DataError, match=re.escape(f"{path}:3: feature_num says 9 entries")):
        load_aliccp(raw)


def test_raw_unknown_request_key_is_named(raw):
    path = damage(raw, "sample_skeleton_train.csv", 4, lambda s: re.sub(r",[0-9a-f]{32},", ",deadbeef,", s))
    with pytest.raises(DataError, match=re.escape(f"{path}:4: request key 'deadbeef' is not in")):
        load_aliccp(raw)


def test_raw_non_binary_label_is_named(raw):
    path = damage(raw, "sample_skeleton_train.csv", 5, lambda s: re.sub(r"^(\d+),\d,", r"\1,2,", s))
    with pytest.raises(DataError, match=re.escape(f"{path}:5: click is '2'; it holds 0 or 1")):
        load_aliccp(raw)


def test_tenrec_like_without_click_is_named(layouts, tmp_path):
    folder = tmp_path / "tenrec"
    folder.mkdir()
    text = (layouts["tenrec"] / "QK-video.csv").read_text().split("\n")
    header = text[0].split(",")
    cells = text[5].split(",")
    cells[header.index("click")], cells[header.index("like")] = "0", "1"
    text[5] = ",".join(cells)
    (folder / "QK-video.csv").write_text("\n".join(text))
    with pytest.raises(DataError, match=re.escape(f"{folder / 'QK-video.csv'}:6: like 1 without a click")):
        load_tenrec(folder)
    (folder / "QB-video.csv").write_text(text[0] + "\n")
    with pytest.raises(DataError, match=r"several Tenrec logs .* pick one with --set data.tenrec_file"):
        load_tenrec(folder)


@pytest.mark.skipif(not (SHARED / "aliexpress-sample").exists(), reason="../shared/data is not here (a fresh clone)")
def test_the_shared_aliexpress_sample_loads():
    data = load_aliexpress(SHARED / "aliexpress-sample")
    assert data.report.rows_read == 120 and leak_violations(data) == []
    assert data.stages == ("exposure", "click", "conversion")


@pytest.mark.parametrize("layout", ["aliccp", "aliccp-raw", "aliexpress", "kuairand", "tenrec"])
def test_each_layout_converts_into_a_cache_with_every_simulated_positive(layout, layouts, truth, tmp_path):
    from csmf.config import Config, override
    from csmf.data.datasets import convert

    name = "aliccp" if layout.startswith("aliccp") else layout
    cfg = override(Config(), [f"data.dataset={name}", f"data.data_dir={layouts[layout]}",
                              f"data.cache_dir={tmp_path / 'c'}"])  # fmt: skip
    cache = convert(cfg)
    assert cache.stages == STAGE_NAMES[layout] and cache.manifest["rows"] == truth.num_rows
    data = cache.cascade(name)
    assert leak_violations(data) == []
    for ours, theirs in zip(data.stages, ("exposure", "click", "conversion"), strict=True):
        assert union(data.train[ours], data.valid[ours], data.test[ours]).nnz == distinct_pairs(truth, theirs)
    if name == "aliexpress":  # the item is its category tuple: the same catalogue and searches as in memory
        memory = load(layout, layouts[layout])
        assert (data.n_users, data.n_items) == (memory.n_users, memory.n_items)
        assert set(data.user_features) == set(memory.user_features)
        assert set(data.item_features) == set(memory.item_features)
    if name == "aliccp":  # the release's files are the split: the same pairs as the in-memory loader
        memory = load(layout, layouts[layout])
        for stage in data.stages:
            assert data.test[stage].nnz == memory.test[stage].nnz and data.train[stage].nnz == memory.train[stage].nnz
