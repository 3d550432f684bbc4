"""`csmf trainspeed`: training batches per second on an idle and on a loaded machine, per OpenMP wait policy.

Each measurement is a fresh process (the wait policy is read when OpenMP starts): it builds the MLP cascade
on the packaged JD data and times stage-1 training steps for a fixed wall time. "Loaded" runs one busy
process per core beside it. The ratio idle / loaded says how much another job's load costs; with spinning
OpenMP threads (ACTIVE) each parallel region waits for threads that cannot run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

POLICIES = ("ACTIVE", "PASSIVE")


def steps_per_second(seconds: float) -> float:
    """Stage-1 training steps of the MLP preset on JD, for `seconds` of wall time (after one warm-up step)."""
    import numpy as np
    import torch

    from csmf.cascade import CascadeTrainer
    from csmf.config import load_config
    from csmf.data.batches import log_q as item_log_q
    from csmf.data.datasets import load_dataset

    cfg = load_config("mlp")
    data = load_dataset(cfg)
    trainer = CascadeTrainer(data, cfg)
    users, items, _ = trainer._stage_pairs(1)
    log_q = item_log_q(items, data.n_items)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(trainer.model.parameters(), lr=1e-3)
    order = np.random.default_rng(0).permutation(len(users))
    size = cfg.train.batch_size

    def step(n: int) -> None:
        rows = order[(n * size) % (len(order) - size) :][:size]
        optimizer.zero_grad()
        trainer._loss(1, users[rows], items[rows], 0.0, log_q, generator).backward()
        trainer.model.mask_grads(1)
        optimizer.step()

    step(0)
    n, start = 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(n)
        n += 1
    return (n - 1) / (time.perf_counter() - start)


def _hogs(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def run_trainspeed(out: str | Path, seconds: float = 20.0, log=print) -> dict:
    """Measure every (policy, load) pair in its own process; write and return the results."""
    results = []
    for policy in POLICIES:
        row = {"omp_wait_policy": policy}
        for load in ("idle", "loaded"):
            hogs = _hogs(os.cpu_count() or 1) if load == "loaded" else []
            try:
                env = dict(os.environ, OMP_WAIT_POLICY=policy)
                command = [sys.executable, "-m", "csmf.experiments.trainspeed", str(seconds)]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                row[f"{load}_batches_per_s"] = round(float(done.stdout.strip().splitlines()[-1]), 2)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
        row["slowdown_under_load"] = round(row["idle_batches_per_s"] / max(row["loaded_batches_per_s"], 1e-9), 2)
        log(f"OMP_WAIT_POLICY={policy}: idle {row['idle_batches_per_s']} batch/s, loaded "
            f"{row['loaded_batches_per_s']} batch/s ({row['slowdown_under_load']}x slower)")  # fmt: skip
        results.append(row)
    summary = {"cores": os.cpu_count(), "seconds_per_measurement": seconds, "busy_processes": os.cpu_count(),
               "torch_threads": "default", "results": results}  # fmt: skip
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":  # one measurement, in the wait policy the parent set
    print(steps_per_second(float(sys.argv[1])))
