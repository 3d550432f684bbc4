"""Training with several processes (csmf.distributed: torchrun, DistributedDataParallel over gloo on CPU).

Two processes train a small cascade end to end through `csmf train --nproc 2`, and the run is checked
against one process with the same global batch and seed: every phase ends with the ranks holding the same
weights and unit owners (the trainer all-gathers a checksum of the whole state after each phase and stops on
a mismatch, so a finished run is the proof; owners are in the state, so both ranks pruned the same units),
earlier stages' weights are bit-identical after later stages, and the final metrics are within TOLERANCE.
A 2-process run killed mid-cascade resumes with one process and ends within the same tolerance.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cascade import changed_and_frozen

from csmf.checkpoints import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed in this build")

# |R@50 of 2 processes - R@50 of 1| on every objective: the processes draw in-batch negatives from their
# half of each global batch (and dropout masks from their own draws), so the runs are close, not identical
TOLERANCE = 0.05
SETTINGS = ["--dataset", "sim", "--config", "mlp", "--quiet", "--set", "sim.n_users=400", "--set", "sim.n_items=300",
            "--set", "train.batch_size=256", "--set", "train.extra_negatives=256"]  # fmt: skip


def train(out: Path, nproc: int, *extra: str, wait: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    command = [sys.executable, "-m", "csmf.cli", "train", *SETTINGS, "--out", str(out), "--nproc", str(nproc), *extra]
    if not wait:
        return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _descendants(pid: int) -> set[int]:
    """`pid` and every process below it (Linux /proc), whatever session each started."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree = {pid}
    while grown := {p for p, parent in parents.items() if parent in tree} - tree:
        tree |= grown
    return tree


def recall(out: Path) -> dict[str, float]:
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    return {stage: m["recall@50"] for stage, m in metrics.items()}


def phase_state(out: Path, name: str) -> dict:
    (path,) = (out / "checkpoints").glob(f"phase-*-{name}.pt")
    return load_checkpoint(path)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    train(root / "one", 1, "--set", "train.max_epochs=2")
    train(root / "two", 2, "--set", "train.max_epochs=2")
    return root


def test_two_processes_hold_the_same_weights_after_every_phase(runs):
    phases = json.loads((runs / "two" / "checkpoints" / "phases.json").read_text())
    assert [p["phase"] for p in phases] == ["train-1", "prune-1", "recover-1", "train-2", "prune-2", "recover-2",
                                            "train-3"]  # fmt: skip
    assert all(p["processes"] == 2 and len(p["checksum"]) == 64 for p in phases)  # agreed on every rank
    assert len({p["checksum"] for p in phases}) == len(phases)  # and every phase changed something
    assert json.loads((runs / "two" / "metrics.json").read_text())["processes"] == 2


def test_only_the_main_process_writes_the_training_curves(runs):
    """Both ranks train every epoch; one event file holds each curve once (csmf.tracking writes on rank 0 only)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (runs / "two" / "tensorboard").glob("events.out.tfevents.*")
    curves = EventAccumulator(str(events), size_guidance={"scalars": 0})
    curves.Reload()
    phases = json.loads((runs / "two" / "checkpoints" / "phases.json").read_text())
    for phase in (p for p in phases if "epochs" in p):
        assert [e.step for e in curves.Scalars(f"loss/{phase['phase']}")] == [e["epoch"] for e in phase["epochs"]]


def test_earlier_stages_stay_bit_identical_across_processes(runs):
    def owned(state: dict) -> dict:  # without zero-width tables (the MLP preset has no user-ID columns)
        empty = {k.removesuffix(".owner") for k, v in state.items() if k.endswith(".owner") and v.numel() == 0}
        return {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in empty}

    final = owned(phase_state(runs / "two", "train-3"))
    assert changed_and_frozen(owned(phase_state(runs / "two", "recover-1")), final, {1}, stage=3) > 0
    assert changed_and_frozen(owned(phase_state(runs / "two", "recover-2")), final, {1, 2}, stage=3) > 0


def test_two_processes_score_within_tolerance_of_one(runs):
    one, two = recall(runs / "one"), recall(runs / "two")
    assert one.keys() == two.keys() == {"exposure", "click", "conversion"}
    for stage in one:
        assert abs(one[stage] - two[stage]) <= TOLERANCE, (stage, one[stage], two[stage])


def test_all_gathered_negatives_train_in_step_on_both_ranks(runs):
    out = runs / "gathered"
    train(out, 2, "--set", "train.max_epochs=2", "--set", "train.gather_negatives=true")
    phases = json.loads((out / "checkpoints" / "phases.json").read_text())
    assert all(p["processes"] == 2 for p in phases)
    for stage, r in recall(out).items():
        assert abs(r - recall(runs / "one")[stage]) <= TOLERANCE, stage


def test_a_killed_two_process_run_resumes_with_one(runs):
    out = runs / "killed"
    # a long last stage, so the kill lands inside it even when this machine is busy
    epochs = ["--set", "train.max_epochs=2,2,200", "--set", "train.patience=200"]
    run = train(out, 2, *epochs, wait=False)
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob("phase-05-*.pt")):
        assert run.poll() is None, run.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the 2-process run did not reach recover-2"
        time.sleep(0.01)
    # mid train-3: csmf, torchrun and both training processes (torchrun starts each in its own session, so a
    # kill of the process group alone left them training on, racing the resumed run for the checkpoints)
    tree = _descendants(run.pid)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in tree):
        assert time.monotonic() < deadline, "a training process outlived SIGKILL"
        time.sleep(0.05)
    assert not (out / "metrics.json").exists()
    resumed = train(out, 1, *epochs)
    assert "resuming after phase recover-2" in resumed.stdout + resumed.stderr
    phases = json.loads((out / "checkpoints" / "phases.json").read_text())
    assert [p.get("processes", 1) for p in phases] == [2] * 6 + [1]
    reference = runs / "reference"
    train(reference, 1, *epochs)
    for stage, r in recall(out).items():
        assert abs(r - recall(reference)[stage]) <= TOLERANCE, stage


def test_row_reduced_id_tables_train_bit_identically_to_the_dense_all_reduce(runs):
    """Every ID table averaged by the rows each rank touched (runtime.row_reduce_rows = 1) gives the weights the
    dense all-reduce gave, phase by phase (two ranks: a / 2 + b / 2 and (a + b) / 2 round alike)."""
    out = runs / "rows"
    train(out, 2, "--set", "train.max_epochs=2", "--set", "runtime.row_reduce_rows=1")
    dense = json.loads((runs / "two" / "checkpoints" / "phases.json").read_text())
    rows = json.loads((out / "checkpoints" / "phases.json").read_text())
    assert [p["checksum"] for p in rows] == [p["checksum"] for p in dense]


GRAPH = ["--config", "graph", "--set", "model.dim=16", "--set", "train.full_softmax_max_items=100",
         "--set", "train.pool_items=64", "--set", "train.user_batch_size=64", "--set", "train.max_epochs=2",
         "--set", "runtime.row_reduce_rows=1", "--set", "select.candidates="]  # fmt: skip


@pytest.fixture(scope="module")
def graph_runs(tmp_path_factory):
    """The graph encoder past its full-softmax limit: neighbour operators, a pooled per-user loss, row-reduced item
    table; one process and two."""
    root = tmp_path_factory.mktemp("graph")
    train(root / "one", 1, *GRAPH)
    train(root / "two", 2, *GRAPH)
    return root


def test_the_graph_encoder_trains_in_two_processes_that_agree_and_keep_earlier_stages(graph_runs):
    two = graph_runs / "two"
    phases = json.loads((two / "checkpoints" / "phases.json").read_text())
    assert len(phases) == 7 and all(p["processes"] == 2 and len(p["checksum"]) == 64 for p in phases)
    saved = json.loads((two / "metrics.json").read_text())["config"]
    assert saved["model"]["graph_neighbours"] == 32 and saved["model"]["encoder"] == "graph"
    final = phase_state(two, "train-3")
    owner = final["owner"]  # one owner per output column, shared by every column tensor
    for earlier, frozen in (("recover-1", {1}), ("recover-2", {1, 2})):
        before = phase_state(two, earlier)
        keep, mine = torch.isin(owner, torch.tensor(sorted(frozen))), owner == 3
        columns = [k for k, v in final.items() if k != "owner" and v.dim() == 2 and v.shape[1] == len(owner)]
        assert "items" in columns
        for key in columns:
            assert torch.equal(before[key][:, keep], final[key][:, keep]), (earlier, key)
        assert not torch.equal(before["items"][:, mine], final["items"][:, mine])
    # the conversion stage has 155 test users here (a difference of two runs has a standard error of ~0.045): the
    # mean over the objectives holds to TOLERANCE, each objective to twice it
    one, mine = recall(graph_runs / "one"), recall(two)
    assert abs(sum(mine.values()) - sum(one.values())) / len(one) <= TOLERANCE, (mine, one)
    for stage, r in mine.items():
        assert abs(r - one[stage]) <= 2 * TOLERANCE, (stage, r, one[stage])
