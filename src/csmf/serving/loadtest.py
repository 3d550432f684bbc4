"""`csmf loadtest`: start `csmf serve` on 127.0.0.1, drive it with concurrent clients, report the numbers.

Each client sends GET /recommend for a random known user with one of a few objective weightings until
the shared request budget is spent. Reported: throughput, p50/p95/p99 latency (client side, whole HTTP
round trip), the error count (non-200 answers and failed connections) and the server's CPU time per request,
and beside the generator's count the server's own: GET /metrics scraped before and after the run.

The generator is `wrk` (a C load generator; Debian package `wrk`) when it is installed: one wrk thread with
`clients` connections and a Lua script drawing users and weightings, stopping after `requests` answers. It
costs far less CPU per request than the server, so on a small machine it measures the server. Without wrk
the clients are Python (httpx, asyncio) in this process; they spend more CPU per request than the server
on the same cores, so that figure measures them too: a warning says so.

`csmf loadtest --heavy-clients N` measures isolation instead (`run_isolation`): one client times a cheap GET
/recommend (k 10) alone, then while N client processes loop the largest request the limits allow (POST /recommend
with --max-ids ids x the k that --max-results leaves), and reports both p50/p99 and their ratio; and it times the
refusal of an oversized id list (400,000 integers, under the body limit).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 1800.0) -> None:
    """Until the server answers /health (building a large HNSW graph takes minutes), or it exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"csmf serve exited with code {process.returncode} before answering /health")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"csmf serve did not answer {url}/health within {timeout:.0f}s")


async def _drive(url: str, users: list[str], weightings: list[str], clients: int, requests: int, k: int, seed: int):
    latencies: list[float] = []
    errors = 0
    remaining = requests
    rng = np.random.default_rng(seed)
    picks = [(users[rng.integers(len(users))], weightings[rng.integers(len(weightings))]) for _ in range(requests)]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            user, weights = picks[remaining]
            t0 = time.perf_counter()
            try:
                response = await http.get(f"{url}/recommend", params={"user_id": user, "k": k, "weights": weights})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    async with httpx.AsyncClient(limits=limits, timeout=30.0) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return latencies, errors, wall


WRK_SCRIPT = """
local users, weights = {}, {}
for line in io.lines("%(users)s") do users[#users + 1] = line end
for line in io.lines("%(weights)s") do weights[#weights + 1] = line end
math.randomseed(%(seed)d)
request = function()
  return wrk.format("GET", "/recommend?k=%(k)d&user_id=" .. users[math.random(#users)]
    .. "&weights=" .. weights[math.random(#weights)])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "seconds": %%.6f, "errors": %%d, "p50": %%d, "p95": %%d, "p99": %%d}\\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time so far of a process and its live children (the worker processes of
    `csmf serve --workers`), from Linux /proc; None elsewhere."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # a process that ended meanwhile
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])))  # (parent, ticks)
    if pid not in stats:
        return None
    tree = {pid}
    while grown := {p for p, (parent, _) in stats.items() if parent in tree} - tree:
        tree |= grown
    return sum(stats[p][1] for p in tree) / os.sysconf("SC_CLK_TCK")


def _start_server(artifact: str | Path, index: str, serve_options: dict | None) -> tuple[str, subprocess.Popen]:
    """`csmf serve` on a free local port: (its URL, the process)."""
    port = _free_port()
    command = [sys.executable, "-m", "csmf.cli", "serve", "--artifact", str(artifact), "--port", str(port),
               "--index", index]  # fmt: skip
    for name, value in (serve_options or {}).items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    return f"http://127.0.0.1:{port}", process


def _scrape(url: str) -> dict[str, float]:
    """From the server's GET /metrics (every worker's): GET /recommend requests answered (any status), index
    searches of one-user requests and the queries in them, so far."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics", timeout=30.0)
    response.raise_for_status()
    found = {"requests": 0.0, "searches": 0.0, "queries": 0.0}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "csmf_requests_total" and (labels["route"], labels["method"]) == ("/recommend", "GET"):
                found["requests"] += sample.value
            elif sample.name.startswith("csmf_search_batch_queries_") and labels.get("source") == "batcher":
                key = {"csmf_search_batch_queries_count": "searches", "csmf_search_batch_queries_sum": "queries"}
                if sample.name in key:
                    found[key[sample.name]] += sample.value
    return found


def _counted(before: dict[str, float], after: dict[str, float], answered: int) -> dict:
    """The server's count of a run beside the generator's: wrk counts the answers it read within its duration,
    the server also those of the requests still in flight when wrk stopped (at most one a connection)."""
    requests, searches = after["requests"] - before["requests"], after["searches"] - before["searches"]
    return {"requests": int(requests), "difference_pct": 100.0 * (requests - answered) / max(answered, 1),
            "queries_per_search": (after["queries"] - before["queries"]) / searches if searches else 0.0}  # fmt: skip


def _drive_wrk(url: str, users: list[str], weightings: list[str], clients: int, seconds: float, k: int,
               seed: int) -> tuple[dict, int, float, int]:  # fmt: skip
    """(latency percentiles in ms, errors, seconds, answers) of wrk driving the server for `seconds` (wrk runs
    for a duration: a thread told to stop at a count still waits out the duration)."""
    import tempfile
    from urllib.parse import quote

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "users.txt").write_text("\n".join(quote(u, safe="") for u in users) + "\n")
        (folder / "weights.txt").write_text("\n".join(quote(w, safe=":,") for w in weightings) + "\n")
        script = WRK_SCRIPT % {"users": folder / "users.txt", "weights": folder / "weights.txt", "seed": seed,
                               "k": k}  # fmt: skip
        (folder / "load.lua").write_text(script)
        # one generator thread, so the server gets the other cores
        command = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s",
                   str(folder / "load.lua"), url]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    line = next((x for x in done.stdout.splitlines() if x.startswith("{")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    got = json.loads(line)
    latency = {p: got[p] / 1000 for p in ("p50", "p95", "p99")}  # wrk reports microseconds
    return latency, int(got["errors"]), float(got["seconds"]), int(got["requests"])


def run_loadtest(
    artifact: str | Path,
    clients: int = 32,
    requests: int = 20_000,
    k: int = 50,
    index: str = "exact",
    out: str | Path | None = None,
    seed: int = 0,
    log=logger.info,
    generator: str = "auto",
    seconds: float = 20.0,
    serve_options: dict[str, int] | None = None,
) -> dict:
    """generator: "wrk", "python", or "auto" (wrk when installed, else the Python clients with a warning).
    serve_options: more `csmf serve` flags by name, e.g. {"workers": 2, "ef_search": 64}.
    wrk runs for `seconds` (after a 3-second warm-up) and reports the requests it got answered; the Python
    clients send exactly `requests`."""
    import shutil

    from csmf.serving.artifact import load_artifact

    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
        if generator == "python":
            log("warning: wrk is not installed (Debian: apt-get install wrk); the Python clients share the cores "
                "and spend more CPU per request than the server, so this measures them too")  # fmt: skip

    art = load_artifact(artifact)
    stages = art.stages
    weightings = [f"{stages[0]}:1", f"{stages[-1]}:1", ",".join(f"{s}:{(n + 1) / len(stages):.2f}" for n, s in
                  enumerate(stages))]  # fmt: skip
    url, process = _start_server(artifact, index, serve_options)
    try:
        _wait_healthy(url, process)
        if generator == "wrk":
            _drive_wrk(url, art.user_ids[:1000], weightings, clients, 3, k, seed + 1)  # warm-up, not reported
        counted0 = _scrape(url)  # after the warm-up: the difference is the measured run's
        cpu0 = _cpu_seconds(process.pid)
        if generator == "wrk":
            latency, errors, wall, answered = _drive_wrk(url, art.user_ids[:1000], weightings, clients, seconds, k,
                                                         seed)  # fmt: skip
        else:
            latencies, errors, wall = asyncio.run(_drive(url, art.user_ids, weightings, clients, requests, k, seed))
            ms = np.array(latencies) * 1000
            latency = {p: float(np.percentile(ms, q)) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))}
            answered = requests
        cpu1 = _cpu_seconds(process.pid)
        counted1 = _scrape(url)
    finally:
        process.terminate()
        process.wait(timeout=30)
    server_ms = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) * 1000 / max(answered, 1)
    result = {
        "artifact": str(artifact),
        "index": index,
        "serve_options": serve_options or {},
        "generator": generator,
        "clients": clients,
        "requests": answered,
        "k": k,
        "errors": int(errors),
        "seconds": wall,
        "throughput_rps": answered / wall,
        "latency_ms": latency,
        "server_cpu_ms_per_request": server_ms,
        "server_counted": _counted(counted0, counted1, answered),
        "cores": os.cpu_count(),
    }
    cpu = f", server CPU {server_ms:.2f} ms a request" if server_ms is not None else ""
    counted = result["server_counted"]
    log(f"{answered:,} requests from {clients} {generator} connections in {wall:.1f}s: "
        f"{result['throughput_rps']:.0f} req/s, p50 {latency['p50']:.1f} ms, p95 {latency['p95']:.1f} ms, "
        f"p99 {latency['p99']:.1f} ms, {errors} errors{cpu}; GET /metrics counted {counted['requests']:,} "
        f"({counted['difference_pct']:+.2f}%), {counted['queries_per_search']:.1f} queries a search")  # fmt: skip
    return _written(result, out, log)


# ----- isolation: a cheap request's latency while other clients loop the most expensive one --------------------------
OVERSIZED_IDS = 400_000  # integers in the oversized body: 0-9 each, about 800 KB, under the 1 MiB body limit


def _loop_largest(url: str, body: bytes, stop, answered) -> None:
    """One heavy client (a process of its own, so its HTTP work does not slow the timing client): POSTs `body`
    until `stop` is set, counting the answers that were 200."""
    with httpx.Client(timeout=120.0) as http:
        while not stop.is_set():
            response = http.post(f"{url}/recommend", content=body, headers={"content-type": "application/json"})
            with answered.get_lock():
                answered.value += response.status_code == 200


def _time_cheap(url: str, users: list[str], seconds: float, pause: float) -> list[float]:
    """Latencies (ms) of one client sending GET /recommend (k 10, a new user each time) for `seconds`, `pause`
    seconds apart: a trickle that measures the server's answer time without loading it."""
    latencies = []
    with httpx.Client(timeout=120.0) as http:
        end, n = time.perf_counter() + seconds, 0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            response = http.get(f"{url}/recommend", params={"user_id": users[n % len(users)], "k": 10})
            latencies.append((time.perf_counter() - t0) * 1000)
            if response.status_code != 200:
                raise RuntimeError(f"GET /recommend answered {response.status_code}: {response.text[:200]}")
            n += 1
            time.sleep(pause)
    return latencies


def _percentiles(ms: list[float]) -> dict:
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "requests": len(ms)}


def run_isolation(
    artifact: str | Path,
    heavy_clients: int = 2,
    seconds: float = 10.0,
    index: str = "exact",
    out: str | Path | None = None,
    log=logger.info,
    serve_options: dict | None = None,
    pause: float = 0.005,
) -> dict:
    """A cheap GET /recommend's p50/p99 idle, then while `heavy_clients` processes loop the largest POST /recommend
    the server's limits allow (each phase `seconds`), and the time to refuse 400,000 integer ids (5 tries)."""
    import multiprocessing

    from csmf.serving.artifact import load_artifact

    art = load_artifact(artifact)
    users = list(art.user_ids[:1000])
    url, process = _start_server(artifact, index, serve_options)
    try:
        _wait_healthy(url, process)
        limits = httpx.get(f"{url}/info", timeout=30.0).json()["limits"]
        n_ids = min(limits["max_ids"], len(art.user_ids))
        k = min(limits["max_results"] // n_ids, limits["max_k"])
        largest = json.dumps({"user_ids": list(art.user_ids[:n_ids]), "k": k}).encode()
        first = httpx.post(f"{url}/recommend", content=largest, headers={"content-type": "application/json"},
                           timeout=120.0)  # fmt: skip
        if first.status_code != 200:
            raise RuntimeError(f"the largest request ({n_ids} ids x k {k}) answered {first.status_code}: "
                               f"{first.text[:200]}")  # fmt: skip
        _time_cheap(url, users, 1.0, pause)  # warm-up, not reported
        idle = _time_cheap(url, users, seconds, pause)
        spawn = multiprocessing.get_context("spawn")  # the parent holds threads (BLAS): no fork
        stop, answered = spawn.Event(), spawn.Value("i", 0)
        heavy = [spawn.Process(target=_loop_largest, args=(url, largest, stop, answered)) for _ in range(heavy_clients)]
        for p in heavy:
            p.start()
        try:
            time.sleep(2.0)  # the heavy clients under way
            before, t0 = answered.value, time.perf_counter()
            loaded = _time_cheap(url, users, seconds, pause)
            heavy_rate = (answered.value - before) / (time.perf_counter() - t0)
        finally:
            stop.set()
            for p in heavy:
                p.join(timeout=120)
        oversized = ("[" + ",".join(str(n % 10) for n in range(OVERSIZED_IDS)) + "]").encode()
        body = b'{"user_ids":' + oversized + b',"k":10}'
        refusals, statuses = [], []
        cpu0 = _cpu_seconds(process.pid)
        for _ in range(5):
            t0 = time.perf_counter()
            response = httpx.post(f"{url}/recommend", content=body, headers={"content-type": "application/json"},
                                  timeout=120.0)  # fmt: skip
            refusals.append((time.perf_counter() - t0) * 1000)
            statuses.append(response.status_code)
        cpu1 = _cpu_seconds(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
    result = {
        "artifact": str(artifact),
        "index": index,
        "serve_options": serve_options or {},
        "cores": os.cpu_count(),
        "largest_request": {"ids": n_ids, "k": k, "clients": heavy_clients, "answered_per_s": heavy_rate},
        "cheap_request": f"GET /recommend, k 10, one client, {pause * 1000:.0f} ms apart",
        "idle_ms": _percentiles(idle),
        "loaded_ms": _percentiles(loaded),
        "oversized_ids": {"ids": OVERSIZED_IDS, "bytes": len(body), "statuses": statuses,
                          "round_trip_ms_median": float(np.median(refusals)),
                          "server_cpu_ms_each": None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) * 200},
    }  # fmt: skip
    result["p50_ratio"] = result["loaded_ms"]["p50"] / result["idle_ms"]["p50"]
    result["p99_ratio"] = result["loaded_ms"]["p99"] / result["idle_ms"]["p99"]
    i, lo, o = result["idle_ms"], result["loaded_ms"], result["oversized_ids"]
    log(f"cheap GET idle p50 {i['p50']:.1f} ms, p99 {i['p99']:.1f} ms; with {heavy_clients} clients looping "
        f"{n_ids} ids x k {k} ({heavy_rate:.1f} answered/s): p50 {lo['p50']:.1f} ms, p99 {lo['p99']:.1f} ms "
        f"(p99 x{result['p99_ratio']:.1f}); {OVERSIZED_IDS:,} integer ids ({len(body):,} bytes) refused "
        f"{sorted(set(statuses))} in {o['round_trip_ms_median']:.1f} ms")  # fmt: skip
    return _written(result, out, log)


def _written(result: dict, out: str | Path | None, log: Callable[[str], None]) -> dict:
    """`result`, also written as JSON to `out` when given (the folder made), and said."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        log(f"wrote {out}")
    return result
