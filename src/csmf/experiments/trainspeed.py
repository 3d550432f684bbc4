"""`csmf trainspeed`: training batches per second on an idle and on a loaded machine, per OpenMP wait policy.

Each measurement is a fresh process (the wait policy is read when OpenMP starts): it builds the configured
backbone (the MLP preset on the packaged JD data unless --config/--set say otherwise) and times stage-1
training steps for a fixed wall time. "Loaded" runs one busy
process per core beside it. The ratio idle / loaded says how much another job's load costs; with spinning
OpenMP threads (ACTIVE) each parallel region waits for threads that cannot run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from csmf.config import Config, save_config

logger = logging.getLogger(__name__)

POLICIES = ("ACTIVE", "PASSIVE")


def steps_per_second(seconds: float, config: str) -> float:
    """Stage-1 training steps of the config in TOML file `config` (its data, backbone and loss), for `seconds` of
    wall time (after one warm-up step)."""
    import numpy as np
    import torch

    from csmf.backbones import build_backbone
    from csmf.config import load_config, per_stage
    from csmf.data.batches import PairBatch, log_q, stage_pairs
    from csmf.data.datasets import load_dataset
    from csmf.stage_loss import PairLoss

    cfg = load_config(config)
    data = load_dataset(cfg)
    tuning = data.tuning_view()
    model = build_backbone(data, cfg, cfg.seed)
    model.set_history({b: tuning.matrix(b) for b in model.behaviours})
    users, items, _ = stage_pairs(tuning, data.stages[0], per_stage(cfg.train.aux_weight, 1))
    full = data.n_items <= cfg.train.full_softmax_max_items
    loss = PairLoss(model, 1, cfg, log_q(items, data.n_items), torch.Generator().manual_seed(0), full)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = np.random.default_rng(0).permutation(len(users))
    size = cfg.train.batch_size

    def step(n: int) -> None:
        rows = order[(n * size) % (len(order) - size) :][:size]
        optimizer.zero_grad()
        loss(PairBatch(users[rows].astype(np.int64), items[rows].astype(np.int64))).backward()
        model.mask_grads(1)
        optimizer.step()

    step(0)
    n, start = 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(n)
        n += 1
    return (n - 1) / (time.perf_counter() - start)


def _hogs(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def run_trainspeed(out: str | Path, cfg: Config, seconds: float = 20.0, log=logger.info) -> dict:
    """Measure every (policy, load) pair in its own process, training `cfg` (csmf trainspeed: the mlp preset
    unless --config/--set say otherwise); write and return the results."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        save_config(cfg, config)
        for policy in POLICIES:
            results.append(_measure(policy, str(config), seconds, log))
    summary = {"cores": os.cpu_count(), "seconds_per_measurement": seconds, "busy_processes": os.cpu_count(),
               "torch_threads": "default", "encoder": cfg.model.encoder, "results": results}  # fmt: skip
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(summary, indent=2))
    return summary


def _measure(policy: str, config: str, seconds: float, log) -> dict:
    """Batches per second idle and loaded, each in a fresh process with OMP_WAIT_POLICY = `policy`."""
    row = {"omp_wait_policy": policy}
    for load in ("idle", "loaded"):
        hogs = _hogs(os.cpu_count() or 1) if load == "loaded" else []
        try:
            env = dict(os.environ, OMP_WAIT_POLICY=policy)
            command = [sys.executable, "-m", "csmf.experiments.trainspeed", str(seconds), config]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            row[f"{load}_batches_per_s"] = round(float(done.stdout.strip().splitlines()[-1]), 2)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    row["slowdown_under_load"] = round(row["idle_batches_per_s"] / max(row["loaded_batches_per_s"], 1e-9), 2)
    log(f"OMP_WAIT_POLICY={policy}: idle {row['idle_batches_per_s']} batch/s, loaded "
        f"{row['loaded_batches_per_s']} batch/s ({row['slowdown_under_load']}x slower)")  # fmt: skip
    return row


if __name__ == "__main__":  # one measurement, in the wait policy the parent set
    sys.stdout.write(f"{steps_per_second(float(sys.argv[1]), sys.argv[2])}\n")  # data the parent reads, not a log
