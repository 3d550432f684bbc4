"""Multi-process training on PyTorch's own engine: torch.distributed, DistributedDataParallel, torchrun.

`csmf train --nproc N` (or `torchrun --nproc-per-node N -m csmf.torchrun_entry ...`) starts N processes; each
reads the same data, takes its share of every global batch, and DDP averages the gradients (gloo on CPU,
nccl on CUDA). The cascade's guarantees hold across processes because everything after the all-reduce is
the same on every rank: the stage masks zero the same gradient entries, the same optimizer step follows,
CPP and AR decisions are made on rank 0 and broadcast (`broadcast_owners`), and `check_agreement`
compares a checksum of every parameter and owner buffer across ranks after each phase (a mismatch is an
error, never a silent divergence). Validation and test evaluation are sharded by user and their sums
all-reduced (`all_sum`), so they give one process's metrics. Only rank 0 writes checkpoints and results.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch (parts differ in size by at most one)."""
        return np.array_split(rows, self.world)[self.rank] if self.active else rows


def ranks() -> Ranks:
    """The process group this process belongs to (torch.distributed), or one process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def resolve_device(name: str) -> torch.device:
    """runtime.device as a torch device: "auto" is CUDA when a GPU is present, else the CPU; under torchrun
    each process takes the GPU of its LOCAL_RANK."""
    from csmf.config import ConfigError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ConfigError(f"runtime.device: {name!r} is not one of ['cpu', 'cuda', 'auto']")
    if not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' asked for, but this PyTorch sees no GPU; use cpu or auto")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> Ranks:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...):
    gloo for CPU training, nccl for CUDA. One process: nothing to join."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return ranks()
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; train with one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return ranks()


def launch(nproc: int, train_args: list[str]) -> int:
    """`csmf train --nproc N`: run N training processes on this machine with torchrun (torch.distributed.run,
    a standalone rendezvous on a free local port); returns their exit status."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "csmf.torchrun_entry", *train_args]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # the cores, shared out
    return subprocess.run(command, env=env, check=False).returncode


def shutdown(finished: bool) -> None:
    """Leave the process group. Ranks that finished first meet, so none tears its connections down while a peer
    is still in a collective; a failed rank leaves at once (its peers' collectives then fail on their own)."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if ranks().active:
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the ranks (float64, so one process's sums are reproduced to rounding)."""
    if not ranks().active:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(value):
    """Rank 0's value on every rank (a validation score, a decision)."""
    if not ranks().active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_owners(model: nn.Module) -> None:
    """Every rank takes rank 0's unit owners: one pruning decision for all."""
    if not ranks().active:
        return
    for _, _, owner in model.prunable():
        dist.broadcast(owner, src=0)
    model.sync_output_owner()


def state_checksum(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, bit for bit (owners included)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RanksDisagree(RuntimeError):
    """The training processes hold different weights: a bug, stopped before it is trained on."""


def check_agreement(model: nn.Module, where: str) -> str:
    """The state checksum, checked to be the same on every rank; raises RanksDisagree otherwise."""
    mine = state_checksum(model)
    if not ranks().active:
        return mine
    every = [None] * ranks().world
    dist.all_gather_object(every, mine)
    if len(set(every)) != 1:
        raise RanksDisagree(f"{where}: the ranks hold different weights (checksums {every})")
    return mine


def gather_rows(vectors: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's batch item vectors (differentiable: each rank's loss sends gradient back to the rank that
    computed a vector) and ids, concatenated in rank order; and where this rank's rows start."""
    from torch.distributed.nn.functional import all_gather

    world, rank = ranks().world, ranks().rank
    sizes = [torch.zeros(1, dtype=torch.long, device=vectors.device) for _ in range(world)]  # nccl: on the device
    dist.all_gather(sizes, torch.tensor([len(ids)], device=vectors.device))
    sizes = [int(n) for n in sizes]
    most = max(sizes)  # all_gather takes equal shapes: pad to the largest share, then cut back
    padded = torch.cat([vectors, vectors.new_zeros(most - len(ids), vectors.shape[1])])
    parts = all_gather(padded)
    id_parts = [torch.zeros(most, dtype=ids.dtype, device=ids.device) for _ in range(world)]
    dist.all_gather(id_parts, torch.cat([ids, ids.new_full((most - len(ids),), -1)]))
    every = torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
    every_ids = torch.cat([p[:n] for p, n in zip(id_parts, sizes, strict=True)])
    return every, every_ids, sum(sizes[:rank])


class StepModule(nn.Module):
    """What DistributedDataParallel wraps: a model whose forward runs a loss closure over it, so DDP sees every
    training loss (the cascade's losses are methods of the trainer, not one forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, compute):
        return compute()


def data_parallel(model: nn.Module, device: torch.device, row_reduced: tuple[str, ...] = ()) -> nn.Module:
    """DDP around `model`: gradients averaged over the ranks in backward. Owners (buffers) are broadcast
    only when they change (`broadcast_owners`), not before every step; a stage leaves some units unused.
    row_reduced: names of parameters DDP leaves alone; `reduce_rows` averages them after backward."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index or 0] if device.type == "cuda" else None
    wrapped = StepModule(model)
    if row_reduced:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            wrapped, [f"model.{name}" for name in row_reduced]
        )
    return DistributedDataParallel(wrapped, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)


def reduce_rows(table: nn.Parameter) -> None:
    """Average `table`'s gradient over the ranks through the rows each rank touched: the touched row indices and
    their gradients are all-gathered (in rank order, so every rank sums the same numbers in the same order) and
    added into a zeroed gradient. With two ranks this equals DDP's dense average bit for bit (a / 2 + b / 2 and
    (a + b) / 2 round alike); it moves the batch's rows, not the whole table. When the ranks touched as many rows
    as the table has (every rank decides alike from the gathered counts), the dense all-reduce moves less."""
    world = ranks().world
    if table.grad is None:  # this rank's batch did not reach the table: it still takes part
        table.grad = torch.zeros_like(table)
    grad = table.grad
    rows = torch.nonzero(grad.abs().sum(dim=1)).squeeze(1)
    sizes = [torch.zeros(1, dtype=torch.long, device=grad.device) for _ in range(world)]  # nccl: on the device
    dist.all_gather(sizes, torch.tensor([len(rows)], device=grad.device))
    sizes = [int(n) for n in sizes]
    if sum(sizes) >= grad.shape[0]:  # the batches reached most of the table: the dense average moves less
        dist.all_reduce(grad)
        grad.div_(world)
        return
    values = grad.index_select(0, rows)
    most = max(sizes)  # all_gather takes equal shapes: pad to the largest, then cut back
    row_parts = [torch.zeros(most, dtype=torch.long, device=grad.device) for _ in range(world)]
    value_parts = [grad.new_zeros(most, grad.shape[1]) for _ in range(world)]
    dist.all_gather(row_parts, torch.cat([rows, rows.new_zeros(most - len(rows))]))
    dist.all_gather(value_parts, torch.cat([values, values.new_zeros(most - len(rows), grad.shape[1])]))
    grad.zero_()
    for part_rows, part_values, n in zip(row_parts, value_parts, sizes, strict=True):
        grad.index_add_(0, part_rows[:n], part_values[:n])
    grad.div_(world)
