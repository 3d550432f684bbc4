"""`csmf bench --suite scale`: every row a process of its own (wall time, peak memory), resumable, reported."""

from __future__ import annotations

import json

import pytest

from csmf.cli import main
from csmf.experiments.scale import peak_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_peak_run_measures_its_own_process(tmp_path):
    import sys

    grow = "import time; x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.1)"
    status, wall, peak, peak_at = peak_run([sys.executable, "-c", grow], tmp_path / "big.log", trace_every=0.05)
    assert status == 0 and wall > 0.1 and peak > 0.28  # GiB: the 300 MiB it touched
    assert 0 < peak_at < wall
    trace = [line.split("\t") for line in (tmp_path / "big.rss.tsv").read_text().splitlines()]
    assert trace[0] == ["seconds", "rss_kb", "hwm_kb"] and len(trace) >= 2
    assert max(int(hwm) for _, _, hwm in trace[1:]) <= peak * 2**20  # the trace never exceeds the peak
    status, _, small, _ = peak_run([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "small.log")
    assert status == 3 and small < peak - 0.2


def test_the_quick_scale_suite_runs_each_row_apart_resumes_and_reports(tmp_path, capsys):
    argv = ["bench", "--suite", "scale", "--quick", "--quiet",
            "--set", f"bench.out_dir={tmp_path / 'results'}", "--set", f"bench.report_dir={tmp_path / 'reports'}",
            "--set", "bench.scale_datasets=sim-2m", "--set", "bench.scale_rows=popularity,stream,csmf",
            "--set", "bench.scale_sets=train.max_epochs=1,select.candidates=,bench.sweep_points=0"]  # fmt: skip
    assert main(argv) == 0
    folder = tmp_path / "results" / "scale-quick" / "sim-2m"
    rows = {r: json.loads((folder / f"{r}.json").read_text()) for r in ("popularity", "stream", "csmf")}
    for name, r in rows.items():
        assert "failed" not in r, (name, r.get("failed"))
        assert r["wall_seconds"] > 0 and 0.05 < r["peak_rss_gb"] < 8 and 0 < r["peak_rss_at_s"] <= r["wall_seconds"]
        assert (folder / f"{name}.rss.tsv").read_text().startswith("seconds\trss_kb\thwm_kb\n")
        assert set(r["metrics"]) == {"exposure", "click", "conversion"}
    assert rows["popularity"]["pairs_per_second"] is None and rows["csmf"]["pairs_per_second"] > 0
    assert rows["stream"]["config"]["train"]["stream"] is True
    report = (tmp_path / "reports" / "scale-quick.md").read_text()
    assert "## sim-2m" in report and "| csmf | " in report and "peak RSS GiB" in report
    # a second call finds every row done and only rewrites the report
    stamp = (folder / "csmf.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert (folder / "csmf.json").stat().st_mtime_ns == stamp
    assert "scale: sim-2m" not in again and "wrote" in again


def test_the_42m_csmf_row_trains_the_scale_candidate_since_its_one_epoch_setting_would_drop_it(tmp_path, monkeypatch):
    """train.max_epochs=1 (every row at 42M rows) contradicts the MLP preset's own epochs, so a search would drop
    every MLP candidate and train the graph encoder: the row names the scale candidate instead."""
    import csmf.experiments.scale as scale
    from csmf.config import Config, override
    from csmf.selection import SCALE_CANDIDATE, candidates, pins

    pinned = pins(override(Config(), ["train.max_epochs=1"]))
    assert all(not c.name.startswith("mlp") for c in candidates(Config(), pinned))  # why the row names it
    seen = []

    def record(command, log_path):  # the command only: each row "fails" at once
        seen.append(command)
        log_path.write_text("not run\n")
        return 1, 1.0, 0.1, 0.5

    monkeypatch.setattr(scale, "peak_run", record)
    data = scale.DATASETS["aliccp-42m"]
    for row in ("csmf", "stream"):
        scale.run_row(data, tmp_path, row, [], lambda _m: None)
    csmf_row, stream_row = seen
    preset, *settings = SCALE_CANDIDATE.split()
    assert csmf_row[csmf_row.index("--config") + 1] == preset and "select.candidates=" in csmf_row
    assert all(s in csmf_row for s in settings) and "train.max_epochs=1" in csmf_row
    assert stream_row[stream_row.index("--config") + 1] == "stream" and "select.candidates=" not in stream_row
