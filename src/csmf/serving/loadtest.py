"""`csmf loadtest`: start `csmf serve` on 127.0.0.1, drive it with concurrent clients, report the numbers.

Each client sends GET /recommend for a random known user with one of a few objective weightings until
the shared request budget is spent. Reported: throughput, p50/p95/p99 latency (client side, whole HTTP
round trip) and the error count (non-200 answers and failed connections). The clients run in one asyncio
process next to the server on the same machine, so they share its cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
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


def run_loadtest(
    artifact: str | Path,
    clients: int = 32,
    requests: int = 20_000,
    k: int = 50,
    index: str = "exact",
    out: str | Path | None = None,
    seed: int = 0,
    log=print,
) -> dict:
    from csmf.serving.export import load_artifact

    art = load_artifact(artifact)
    stages = art.stages
    weightings = [f"{stages[0]}:1", f"{stages[-1]}:1", ",".join(f"{s}:{(n + 1) / len(stages):.2f}" for n, s in
                  enumerate(stages))]  # fmt: skip
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "csmf.cli", "serve", "--artifact", str(artifact), "--port", str(port),
               "--index", index]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        _wait_healthy(url, process)
        latencies, errors, wall = asyncio.run(_drive(url, art.user_ids, weightings, clients, requests, k, seed))
    finally:
        process.terminate()
        process.wait(timeout=30)
    ms = np.array(latencies) * 1000
    result = {
        "artifact": str(artifact),
        "index": index,
        "clients": clients,
        "requests": requests,
        "k": k,
        "errors": int(errors),
        "seconds": wall,
        "throughput_rps": requests / wall,
        "latency_ms": {p: float(np.percentile(ms, q)) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "cores": os.cpu_count(),
    }
    log(f"{requests:,} requests from {clients} clients in {wall:.1f}s: {result['throughput_rps']:.0f} req/s, "
        f"p50 {result['latency_ms']['p50']:.1f} ms, p95 {result['latency_ms']['p95']:.1f} ms, "
        f"p99 {result['latency_ms']['p99']:.1f} ms, {errors} errors")  # fmt: skip
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        log(f"wrote {out}")
    return result
