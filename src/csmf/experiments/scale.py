"""`csmf bench --suite scale`: the models at the sizes CSMF is for, each row in a process of its own, so its wall
time and peak resident memory (VmHWM) are its own, with training pairs per second; resumable.

Layout under `<out_dir>/scale/` (`scale-quick` with --quick):
  data/<dataset>/           the generated log (csmf simulate) and its Parquet cache
  <dataset>/<row>/          the row's `csmf bench` results folder
  <dataset>/<row>.json      that row's result with the process's wall seconds, peak RSS (GiB), the second it
                            was reached and pairs/s (a rerun skips every row whose file is there)
  <dataset>/<row>.log       the row's output; <row>.rss.tsv its resident memory every 5 seconds
and `<report_dir>/scale.md`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from csmf.config import Config, ConfigError
from csmf.selection import SCALE_CANDIDATE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleData:
    """A simulated log of the scale suite: `csmf simulate` in `layout` ("log" = one Parquet file)."""

    name: str
    layout: str
    users: int
    items: int
    exposures: int
    sets: tuple[str, ...] = ()  # simulator settings (item features)
    row_sets: tuple[str, ...] = ()  # settings every row trains with on it (one epoch a phase at 42M rows)
    # the CSMF row trains this candidate ("preset key=value ...") without a search: a row setting such as
    # train.max_epochs contradicts the MLP preset's own, so the search would drop every MLP candidate
    csmf_candidate: str = ""

    def source(self, folder: Path) -> Path:
        return folder / "sim.parquet" if self.layout == "log" else folder / self.layout

    def generate(self, folder: Path, log: Callable[[str], None]) -> None:
        """Write the log once (a finished one is kept: its marker file is written last)."""
        done = folder / "generated.json"
        if done.exists():
            return
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "csmf.cli", "simulate", "--out", str(self.source(folder)), "--quiet"]
        command += ["--users", str(self.users), "--items", str(self.items), "--exposures", str(self.exposures)]
        if self.layout != "log":
            command += ["--layout", self.layout]
        for s in self.sets:
            command += ["--set", s]
        log(f"scale: generating {self.name} ({self.users:,} users, {self.items:,} items)")
        subprocess.run(command, check=True)
        # the Parquet cache once here, so no row's time or memory includes building it
        convert = [sys.executable, "-m", "csmf.cli", "data", *self.bench_args(folder), "--convert", "--quiet"]
        subprocess.run(convert, check=True, stdout=subprocess.DEVNULL)
        done.write_text(json.dumps({"command": command[3:], "convert": convert[3:]}))

    def bench_args(self, folder: Path) -> list[str]:
        """The dataset arguments of `csmf bench` for this log, read through the Parquet cache."""
        cache = ["--set", f"data.cache_dir={folder / 'cache'}"]
        if self.layout == "log":
            return ["--dataset", str(self.source(folder)), "--stages", "exposure,click,conversion", *cache]
        dataset = self.layout.removesuffix("-raw")
        return ["--dataset", dataset, "--data-dir", str(self.source(folder)), *cache]


DATASETS = {
    "sim-2m": ScaleData("sim-2m", "log", 100_000, 200_000, 20),
    "aliccp-42m": ScaleData(
        "aliccp-42m",
        "aliccp-raw",
        1_000_000,
        200_000,
        42,
        ("sim.item_features=2",),
        ("train.max_epochs=1", "data.test_users=20000"),  # the streamed row's 20,000 test users, in memory too
        csmf_candidate=SCALE_CANDIDATE,
    ),
}
# --quick: the same rows on logs a test can afford
QUICK = {
    "sim-2m": replace(DATASETS["sim-2m"], users=600, items=500, exposures=15),
    "aliccp-42m": replace(DATASETS["aliccp-42m"], users=600, items=400, exposures=10),
}
# row -> the `csmf bench` arguments that make it
ROWS = {
    "popularity": ["--models", "popularity"],
    "als": ["--models", "als"],
    "itemknn": ["--models", "itemknn"],
    "stream": ["--models", "csmf", "--config", "stream"],
    "csmf": ["--models", "csmf"],
    # the MLP with user-ID rows and history bags (each behaviour's latest model.history_max items): in one epoch the
    # bags' shared item rows learn from every user, where a user's own row sees only that user's pairs
    "csmf-history": ["--models", "csmf", *"--config mlp --set select.candidates= --set model.user_id=true".split()],
}


def peak_run(command: list[str], log_path: Path, poll: float = 0.1,
             trace_every: float = 5.0) -> tuple[int, float, float, float]:  # fmt: skip
    """Run `command` (its output to log_path): (exit status, wall seconds, peak resident memory in GiB, seconds
    from the start to the peak).

    The peak is the process's VmHWM (/proc/<pid>/status), read while it runs: its own memory since exec. The
    wait4 rusage counts the parent's memory at the fork too (a parent holding torch adds ~0.3 GB to every row),
    so it is only the fallback where /proc is missing. Every `trace_every` seconds the resident memory goes to
    <log>.rss.tsv (seconds, VmRSS kB, VmHWM kB), so a row's peak can be matched to its phases afterwards."""
    start = time.perf_counter()
    peak_kb, peak_at, traced = 0, 0.0, -trace_every
    with open(log_path, "w") as out, open(log_path.with_suffix(".rss.tsv"), "w") as trace:
        trace.write("seconds\trss_kb\thwm_kb\n")
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                now = time.perf_counter() - start
                rss_kb, hwm_kb = _memory_kb(proc.pid)
                if hwm_kb > peak_kb:
                    peak_kb, peak_at = hwm_kb, now
                if now - traced >= trace_every:
                    trace.write(f"{now:.1f}\t{rss_kb}\t{hwm_kb}\n")
                    trace.flush()
                    traced = now
                time.sleep(poll)
        except BaseException:
            proc.kill()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    return proc.returncode, wall, (peak_kb or usage.ru_maxrss) / 2**20, peak_at if peak_kb else wall  # kB -> GiB


def _memory_kb(pid: int) -> tuple[int, int]:
    """A running process's resident memory now and its peak since exec (VmRSS, VmHWM, kB); 0s when unreadable."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                found[line[:5]] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def run_row(data: ScaleData, folder: Path, row: str, cfg_sets: list[str], log: Callable[[str], None]) -> dict:
    """One row's result, from its file when an earlier invocation wrote it."""
    path = folder / f"{row}.json"
    if path.exists():
        return json.loads(path.read_text())
    out = folder / row
    command = [sys.executable, "-m", "csmf.cli", "bench", *data.bench_args(folder.parent / "data" / data.name),
               *ROWS[row], "--out", str(out), "--quiet"]  # fmt: skip
    if row == "csmf" and data.csmf_candidate:
        preset, *settings = data.csmf_candidate.split()
        command += ["--config", preset, "--set", "select.candidates=", *(a for s in settings for a in ("--set", s))]
    for s in (*data.row_sets, *cfg_sets):
        command += ["--set", s]
    log(f"scale: {data.name} {row}")
    status, wall, peak_gib, peak_at = peak_run(command, folder / f"{row}.log")
    # peak_rss_gb is GiB (2^30 bytes), as every earlier row; peak_rss_at_s places it among the phases
    measured = {"row": row, "wall_seconds": round(wall, 1), "peak_rss_gb": round(peak_gib, 2),
                "peak_rss_at_s": round(peak_at, 1)}  # fmt: skip
    found = list(out.glob("*/*.json"))
    if status != 0 or len(found) != 1:  # kept and reported (a row that does not fit is a finding), not retried
        last = [line for line in (folder / f"{row}.log").read_text().splitlines() if line.strip()][-1:]
        failed = f"exit {status}: {last[0] if last else 'no output'}"[:300].replace("|", "/")  # a table cell
        result = {**measured, "failed": failed}
        log(f"scale: {data.name} {row} failed ({result['failed']})")
    else:
        result = json.loads(found[0].read_text()) | measured
        pairs = trained_pairs(result)
        result["trained_pairs"] = pairs
        result["pairs_per_second"] = round(pairs / max(result["train_seconds"], 1e-9), 1) if pairs else None
    part = path.with_suffix(".json.partial")
    part.write_text(json.dumps(result, indent=2))
    part.replace(path)
    return result


def trained_pairs(result: dict) -> int:
    """Pairs a neural row trained on, epochs counted (a phase's pairs times its epochs); 0 for the classical rows."""
    phases = result.get("tuning")
    if not isinstance(phases, list):
        return 0
    return int(sum(p.get("pairs", 0) * len(p.get("epochs") or [None]) for p in phases if isinstance(p, dict)))


def run_scale(cfg: Config, quick: bool = False, log: Callable[[str], None] = logger.info) -> Path:
    """Generate the logs, run every row of bench.scale_rows on every dataset of bench.scale_datasets, report."""
    datasets = QUICK if quick else DATASETS
    unknown = sorted(set(cfg.bench.scale_datasets) - set(datasets)) + sorted(set(cfg.bench.scale_rows) - set(ROWS))
    if unknown:
        raise ConfigError(f"bench.scale_datasets / bench.scale_rows: unknown {unknown}; datasets {sorted(datasets)}, "
                          f"rows {sorted(ROWS)}")  # fmt: skip
    suite = "scale-quick" if quick else "scale"
    root = Path(cfg.bench.out_dir) / suite
    sets = list(cfg.bench.scale_sets)
    results: dict[str, list[dict]] = {}
    for name in cfg.bench.scale_datasets:
        data = datasets[name]
        data.generate(root / "data" / name, log)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        results[name] = [run_row(data, folder, row, sets, log) for row in cfg.bench.scale_rows]
    path = Path(cfg.bench.report_dir) / f"{suite}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(scale_report(results, datasets, suite))
    log(f"wrote {path}")
    return path


def scale_report(results: dict[str, list[dict]], datasets: dict[str, ScaleData], suite: str) -> str:
    lines = [f"# CSMF at scale: `{suite}`", "",
             f"Regenerate: `csmf bench --suite scale{' --quick' if suite.endswith('quick') else ''}` (resumable). "
             "Each row is one `csmf bench` process: wall time and peak resident memory (VmHWM, GiB of 2^30 bytes) "
             "are its own (`<row>.rss.tsv` beside the row's result traces it every 5 seconds); pairs/s is the "
             "training pairs of every stage over the fit seconds.", "",
             f"- generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()} with "
             f"{os.cpu_count()} cores, Python {platform.python_version()}", ""]  # fmt: skip
    for name, rows in results.items():
        d = datasets[name]
        stages = next((list(r["metrics"]) for r in rows if "metrics" in r), [])
        made = f"`csmf simulate --layout {d.layout} --users {d.users} --items {d.items} --exposures {d.exposures}`"
        made += "".join(f" `--set {s}`" for s in d.sets)
        made += "; every row with " + ", ".join(f"`{s}`" for s in d.row_sets) if d.row_sets else ""
        made += f"; the csmf row trains `{d.csmf_candidate}` (no search)" if d.csmf_candidate else ""
        lines += [f"## {name}", "", made, ""]
        head = ["row", *[f"{s} R@50" for s in stages], "fit s", "eval s", "sweep s", "wall s", "peak RSS GiB",
                "pairs/s"]  # fmt: skip
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for r in rows:
            if "failed" in r:
                cells = [r["row"], *([f"failed ({r['failed']})"] + [""] * (len(stages) - 1) if stages else []),
                         "", "", "", f"{r['wall_seconds']:.0f}", f"{r['peak_rss_gb']:.2f}", ""]  # fmt: skip
                if not stages:
                    cells[-1] = f"failed ({r['failed']})"
            else:
                rate = f"{r['pairs_per_second']:,.0f}" if r.get("pairs_per_second") else "-"
                cells = [r["row"], *[f"{r['metrics'][s]['recall@50']:.4f}" for s in stages],
                         f"{r['train_seconds']:.0f}", f"{r.get('eval_seconds', 0):.0f}",
                         f"{r.get('sweep_seconds', 0):.0f}", f"{r['wall_seconds']:.0f}", f"{r['peak_rss_gb']:.2f}",
                         rate]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
