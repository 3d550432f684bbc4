"""Where a cascade's training state lives on disk: the run folder's phase checkpoints, tied to the data and
config they were trained on, and the stage-1 pretrain cache runs that differ only downstream share.

Reading never changes a model: `RunFolder.last()` returns the last completed phase (weights and metadata)
and the trainer decides what to do with it. One `csmf train` at a time uses a run folder (`RunLock`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from csmf.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from csmf.config import Config, config_to_dict, same_training
from csmf.data.schema import CascadeData


class RunFolder:
    """phase-NN-<name>.pt per completed phase (weights + JSON metadata) and phases.json, in `path`."""

    def __init__(self, path: Path, phase_names: list[str], objectives: tuple[str, ...], cfg: Config, data: str):
        self.path, self.phase_names, self.objectives, self.cfg, self.data = path, phase_names, objectives, cfg, data

    def save(self, index: int, state: dict[str, torch.Tensor], history: list[dict]) -> None:
        meta = {"phase": index, "history": history, "objectives": list(self.objectives),
                "config": config_to_dict(self.cfg), "data": self.data}  # fmt: skip
        save_checkpoint(self.path / f"phase-{index:02d}-{self.phase_names[index]}.pt", state, meta)
        (self.path / "phases.json").write_text(json.dumps(history, indent=2, default=float))

    def last(self) -> tuple[int, dict[str, torch.Tensor], list[dict], str] | None:
        """(index, weights, history, file name) of the last completed phase; None for a fresh folder.
        Checkpoints of other data, another config or another cascade are a CheckpointError."""
        done = sorted(self.path.glob("phase-*.pt")) if self.path.exists() else []
        if not done:
            return None
        state, meta = load_checkpoint(done[-1])
        if meta.get("data") != self.data:
            raise _other_data(self.path, meta.get("data"), self.data)
        if meta["objectives"] != list(self.objectives) or not same_training(meta["config"], config_to_dict(self.cfg)):
            raise CheckpointError(f"{self.path} holds checkpoints of a run with another config or cascade; {_FIX}")
        return meta["phase"], state, meta["history"], done[-1].name


def refuse_other_data(checkpoints: Path, fingerprint: str) -> None:
    """Raise a CheckpointError when any run folder under `checkpoints` (the model's own, or one per selection
    candidate) holds phases trained on other data: checked before anything is trained or written, whichever
    candidate folders this run will use (a search writes checkpoints/<candidate>, a stored pick checkpoints/)."""
    for path in last_checkpoints(checkpoints):  # a folder's phases all share its data: its last one is read
        stored = load_checkpoint(path)[1].get("data")
        if stored != fingerprint:
            raise _other_data(path.parent, stored, fingerprint)


def last_checkpoints(checkpoints: Path) -> list[Path]:
    """The last phase checkpoint of each run folder under `checkpoints`: the one RunFolder.last resumes from."""
    last: dict[Path, Path] = {}
    for path in sorted(checkpoints.rglob("phase-*.pt")) if checkpoints.exists() else []:
        last[path.parent] = path
    return list(last.values())


_FIX = "use a new --out folder, or --overwrite to discard the checkpoints"


def _other_data(folder: Path, stored: str | None, current: str) -> CheckpointError:
    return CheckpointError(f"{folder} holds checkpoints trained on other data (data fingerprint {stored}, this data "
                           f"{current}); {_FIX}")  # fmt: skip


class PretrainCache:
    """Stage-1 pretraining keyed by everything it reads (data, first objective, seed, model/train/eval config):
    a run that differs only downstream (an ablation, a tau, the single stage-1 tower) loads it bit-identically."""

    def __init__(self, folder: Path, data: CascadeData, cfg: Config, objective: str, fingerprint: str):
        c = config_to_dict(cfg)
        inputs = {
            "data": [data.name, data.stages, c["data"], c["sim"], fingerprint],
            "objective": objective,
            "seed": cfg.seed,
            "model": c["model"],
            "train": c["train"],
            "eval": c["eval"],
        }
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.path = folder / f"pretrain-{key}.pt"

    def load(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(weights, the phase record) when the cache holds this pretraining."""
        if not self.path.exists():
            return None
        state, meta = load_checkpoint(self.path, fix="delete it: it is a cache, and the pretraining runs again")
        return state, meta["record"]

    def store(self, state: dict[str, torch.Tensor], record: dict) -> None:
        save_checkpoint(self.path, state, {"record": record})


class RunFolderBusy(CheckpointError):
    """Another `csmf train` holds the run folder's lock."""


class RunLock:
    """An exclusive flock on <run folder>/train.lock while one `csmf train` uses the folder (under several training
    processes, rank 0 holds it: the one that writes), so two trainings never race for its checkpoints. The file
    records who holds it (pid, host, start time, command) for the message a second one gets. The kernel drops
    the lock when its process ends, however it ends: a killed run leaves no stale lock."""

    NAME = "train.lock"

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / self.NAME
        self._file: TextIO | None = None  # open while the lock is held

    def acquire(self) -> None:
        """Take the lock, or raise RunFolderBusy naming its holder (never waits)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "a+")  # not truncated before the lock is ours: the holder's record stays
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot open the run folder's lock file ({err})") from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read()
            file.close()
            raise RunFolderBusy(f"{self.path.parent} is in use by another csmf train ({_holder(holder)}); wait "
                                "for it to finish, stop it, or train into another --out folder") from None  # fmt: skip
        except OSError as err:
            file.close()
            raise CheckpointError(f"{self.path}: cannot lock it ({err}); this file system may not support file "
                                  "locks: train into an --out folder on a local disk") from None  # fmt: skip
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)[:300]}  # fmt: skip
        file.seek(0)
        file.truncate()
        file.write(json.dumps(record))
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def check(self) -> None:
        """Raise RunFolderBusy when another training holds the lock; leave it free (a launcher's check: the
        training processes it starts take it)."""
        self.acquire()
        self.release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(record: str) -> str:
    """A lock file's record in words."""
    try:
        r = json.loads(record)
        return f"pid {r['pid']} on {r['host']}, started {r['started']}: {r['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"
