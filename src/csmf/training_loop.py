"""The one training loop every neural model runs: epochs of batch losses, a (masked) gradient step,
validation after every epoch, and the best epoch's weights kept (patience stops a run that stopped
improving). The cascade's phases and the multi-task towers differ only in what they hand it: the
batches, the step hook (the cascade masks the gradients of units a stage does not own) and how an
epoch is scored. And the optimiser both use: Adam, with a row-wise SparseAdam on tables that take sparse gradients."""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from csmf.determinism import order_free
from csmf.progress import bar
from csmf.tracking import Tracker


class SplitAdam(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters (RowSparseAdam on sparse-gradient tables, fused Adam on the largest
    tables, Adam on the rest), stepped together as one."""

    def __init__(self, *parts: torch.optim.Optimizer):
        self.parts = parts
        super().__init__([p for o in self.parts for g in o.param_groups for p in g["params"]], {})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        for o in self.parts:
            o.step()


class RowSparseAdam(torch.optim.SparseAdam):
    """SparseAdam's lazy update, bit for bit, written as gathers and writes of the touched rows.

    torch's SparseAdam reads the moments through `sparse_mask` and writes them back as sparse additions, 32% of the
    42M-row release's training profile: a step over a 1M x 64 table with 2,000 touched rows took 5.3 ms against
    2.8 ms here, and a stage-1 epoch of the 2.2M-row simulator 144 s against 124 s. The arithmetic is the same,
    operation for operation, so the numbers are too (tested against torch's); the state is SparseAdam's, so
    checkpoints load either way."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if not grad.is_sparse:
                    raise RuntimeError("RowSparseAdam takes sparse gradients only; dense tables step with Adam")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                grad = -grad if group.get("maximize", False) else grad
                _row_adam_step(param, grad, state, beta1, beta2, group["eps"], float(group["lr"]))
        return loss


def _row_adam_step(param: torch.Tensor, grad: torch.Tensor, state: dict, beta1: float, beta2: float, eps: float,
                   lr: float) -> None:  # fmt: skip
    grad = grad.coalesce()  # the update is non-linear, so each row once (free when mask_grad coalesced it)
    if grad.sparse_dim() != 1:  # not a table's rows: torch's own update
        torch.optim._functional.sparse_adam([param], [grad], [state["exp_avg"]], [state["exp_avg_sq"]],
                                            [state["step"]], eps=eps, beta1=beta1, beta2=beta2, lr=lr,
                                            maximize=False)  # fmt: skip
        return
    rows, values = grad._indices()[0], grad._values()
    if values.numel() == 0:
        return
    exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
    # old + (1 - b) * (new - old), in SparseAdam's order of operations
    old_avg = exp_avg.index_select(0, rows)
    avg = values.sub(old_avg).mul_(1 - beta1).add_(old_avg)
    old_sq = exp_avg_sq.index_select(0, rows)
    sq = values.pow(2).sub_(old_sq).mul_(1 - beta2).add_(old_sq)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    new_param = param.index_select(0, rows).add_(avg.div(sq.sqrt().add_(eps)).mul_(-step_size))
    # a coalesced gradient's rows are distinct, so each write lands once and its result is the same in any order;
    # torch's deterministic mode (csmf.determinism) would take its kernel for repeated indices, 1.4 against 0.8 ms
    # a write of 32k rows, three writes a table every step
    with order_free():
        exp_avg.index_copy_(0, rows, avg)
        exp_avg_sq.index_copy_(0, rows, sq)
        param.index_copy_(0, rows, new_param)


# tables of more rows than this (the catalogues past rules.SCALE_ITEMS) step with fused Adam, one pass over the
# tensor instead of one per Adam operation: 15 ms against 122 ms a step over the 2.2M-row simulator's 194k x 128 item
# table. Its rounding differs in the last bits, so smaller models keep the numbers they always had
FUSED_ROWS = 100_000


def adam(model: nn.Module, lr: float, sparse: list[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """Adam over the model; `sparse` parameters (tables with sparse gradients) get RowSparseAdam instead (lazy
    Adam: only the rows a batch touches move), because a dense step over a million-row table costs ~1 s; tables
    past FUSED_ROWS rows take fused Adam."""
    rest = [p for p in model.parameters() if all(p is not q for q in sparse)]
    large = [p for p in rest if p.dim() > 0 and p.shape[0] > FUSED_ROWS]
    rest = [p for p in rest if all(p is not q for q in large)]
    parts = [RowSparseAdam(list(sparse), lr=lr)] if sparse else []
    parts += [torch.optim.Adam(large, lr=lr, fused=True)] if large else []
    parts += [torch.optim.Adam(rest, lr=lr)] if rest or not parts else []
    return parts[0] if len(parts) == 1 else SplitAdam(*parts)


# where no progress bar shows (stderr is a log file, not a terminal), a long epoch logs a line this often: an epoch of
# the 2.2M-row simulator ran 9 minutes without a word
PROGRESS_LOG_S = 60.0


def run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    epoch_losses: Callable[[], Iterator[torch.Tensor]],
    validate: Callable[[], tuple[float | None, dict]],
    patience: int,
    select: bool = True,
    after_backward: Callable[[], None] | None = None,
    describe: Callable[[int, float, float | None, dict], str] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    progress: bool = False,
    desc: str = "epoch",
    steps: int | None = None,
    tracker: Tracker | None = None,
    phase: str = "",
    pairs: int = 0,
) -> tuple[list[dict], int]:
    """Train for up to `epochs` epochs; returns (one record per epoch, the epoch whose weights the model holds).

    epoch_losses(): a fresh iterator of batch losses for one epoch (it draws the epoch's order itself);
    validate(): (score, metrics) on validation after an epoch, score None when there is nothing to select on;
    select: keep the best-scoring epoch and stop after `patience` epochs without a gain; False = keep the last.
    tracker: gets each epoch's record as `phase` (csmf.tracking), with `pairs` (the training pairs of an epoch)
    over the epoch's training seconds as its pairs/s.
    """
    best, best_state, best_epoch, records = -1.0, None, 0, []
    in_log = progress and not sys.stderr.isatty()  # tqdm draws nothing there
    for epoch in range(1, epochs + 1):
        model.train()
        total, batches = 0.0, 0
        began = said = time.monotonic()
        for loss in bar(epoch_losses(), progress, desc=f"{desc} {epoch}", total=steps, unit="batch", leave=False):
            optimizer.zero_grad()
            loss.backward()
            if after_backward is not None:
                after_backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
            if in_log and time.monotonic() - said >= PROGRESS_LOG_S:
                said = time.monotonic()
                of = f"/{steps:,}" if steps else ""
                log(f"  {desc} {epoch}: {batches:,}{of} batches, {batches / (said - began):.2f} batches/s, "
                    f"mean loss {total / batches:.4f}")  # fmt: skip
        trained_s = time.monotonic() - began
        model.eval()
        score, valid = validate()
        mean_loss = total / max(batches, 1)
        records.append({"epoch": epoch, "loss": round(mean_loss, 5), "valid": valid})
        if tracker is not None:
            rate = pairs / trained_s if pairs and trained_s > 0 else None
            tracker.epoch(phase or desc, epoch, mean_loss, valid, rate)
        if describe is not None:
            log(describe(epoch, mean_loss, score, valid))
        if not select or score is None:  # no validation pairs: keep the last epoch
            continue
        if score > best:
            best, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= patience:
            break
    if select and best_state is not None:
        model.load_state_dict(best_state)
    return records, (best_epoch if select else epochs)
