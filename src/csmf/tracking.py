"""Experiment tracking of a training run: TensorBoard event files in the run's folder and, with track.mlflow_uri, an
MLflow run (the config as parameters, the same metrics, the saved model as an artifact).

The tracker only records what the training loop and the cascade already produce (the epoch and phase records): it
computes nothing that training reads, so a tracked run trains the numbers an untracked one does. What it writes:

- `loss/<phase>`, `valid/<phase>/<metric>` and `pairs_per_s/<phase>`: one value per epoch (step = the epoch);
- `ownership/<unit group>/<owner>` after each prune (step = the stage; owner "free" or "stage-k") and the pruned
  model's `valid/<phase>/<metric>`;
- `test/<objective>/<metric>` at the end (step 0).

MLflow names may not hold "@", so there `recall@50` is `recall_at_50`. Nothing is created before the first value
is recorded: a run that fails its checks leaves no empty event file and no MLflow run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from csmf.config import Config, ConfigError, leaves

logger = logging.getLogger(__name__)
_said_no_tensorboard = False  # "tensorboard is not installed" is said once per process, not once per run


def _tensorboard_installed() -> bool:
    """Whether torch's SummaryWriter can be imported (it needs the tensorboard package); said once when not."""
    global _said_no_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        if not _said_no_tensorboard:
            logger.warning("tensorboard is not installed, so this run writes no TensorBoard event files: "
                           "pip install 'csmf[track]', or set track.tensorboard = false to silence this")  # fmt: skip
            _said_no_tensorboard = True
        return False
    return True


def flat(values: dict, prefix: str = "") -> dict[str, float]:
    """Nested metric dicts (per objective, per metric) as `a/b` names -> numbers; counts and texts left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class MlflowRun:
    """One MLflow run, started on its first metric (parameters: the flattened config); shared by a tracker and its
    children (the candidates of a selection log under their own prefix into the one run)."""

    def __init__(self, uri: str, experiment: str, name: str, cfg: Config):
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(
                f"track.mlflow_uri = {uri!r} needs mlflow, which is not installed: pip install "
                "'csmf[track]' (or mlflow-skinny), or leave track.mlflow_uri empty"
            ) from None
        try:  # the store is opened here, so a URI mlflow refuses fails before any training
            self.client = MlflowClient(tracking_uri=uri)
        except MlflowException as err:
            refused = "MLFLOW_ALLOW_FILE_STORE" in str(err)  # mlflow 3 keeps file stores behind a switch
            fix = (" (mlflow opens a file store only with MLFLOW_ALLOW_FILE_STORE=true in the environment: set it, "
                   "or give a tracking server, http://host:5000)") if refused else ""  # fmt: skip
            raise ConfigError(f"track.mlflow_uri = {uri!r}: mlflow cannot open it{fix}: {err.message}") from None
        self.experiment, self.name, self.cfg = experiment, name, cfg
        self.run_id: str | None = None
        self.failures = (MlflowException, OSError)  # a server that stops answering (requests' errors are OSErrors)
        self.stopped = False

    def _started(self) -> str:
        if self.run_id is None:
            from mlflow.entities import Param

            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=self.name).info.run_id
            params = [Param(key, str(value)) for key, value in leaves(self.cfg).items()]
            self.client.log_batch(self.run_id, params=params)  # the client sends them in chunks the server takes
        return self.run_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name.replace("@", "_at_"), value, now, step) for name, value in values.items()]
        self._send(lambda: self.client.log_batch(self._started(), metrics=metrics))

    def artifact(self, folder: Path, name: str) -> None:
        self._send(lambda: self.client.log_artifacts(self._started(), str(folder), name))

    def _send(self, call: Callable[[], object]) -> None:
        """A tracking server that fails mid-run stops the MLflow logging, not the training (said once)."""
        if self.stopped:
            return
        try:
            call()
        except self.failures as err:
            self.stopped = True
            logger.warning(f"MLflow logging stopped, training goes on (metrics.json and the event files keep the "
                           f"curves): {err}")  # fmt: skip

    def end(self, failed: bool) -> None:
        run_id = self.run_id
        if run_id is not None:
            self._send(lambda: self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED"))


class Tracker:
    """Where one training run records its curves: TensorBoard event files in `folder` (track.tensorboard) and the
    MLflow run (track.mlflow_uri). `Tracker.off()` records nothing; every method is then free to call."""

    def __init__(self, folder: Path | None = None, mlflow: MlflowRun | None = None, prefix: str = ""):
        self.folder, self.mlflow, self.prefix = folder, mlflow, prefix
        self.writer: Any = None  # a SummaryWriter, made on the first value
        self.children: list[Tracker] = []

    @classmethod
    def off(cls) -> Tracker:
        return cls()

    @classmethod
    def open(cls, folder: str | Path, cfg: Config, name: str) -> Tracker:
        """The tracker of a run named `name` whose event files go to `folder`, as cfg.track asks. Raises
        ConfigError at once when track.mlflow_uri is set and mlflow is missing or refuses the URI."""
        t = cfg.track
        writes_events = t.tensorboard and _tensorboard_installed()
        mlflow = MlflowRun(t.mlflow_uri, t.mlflow_experiment, name, cfg) if t.mlflow_uri else None
        return cls(Path(folder) if writes_events else None, mlflow)

    def child(self, name: str) -> Tracker:
        """A part of this run (one candidate of a selection): event files in `folder/name` (TensorBoard shows it
        as a run of its own), MLflow metrics prefixed `name/` in this run's MLflow run; closed with this one."""
        part = Tracker(self.folder / name if self.folder else None, self.mlflow, f"{self.prefix}{name}/")
        self.children.append(part)
        return part

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Record named values at `step` (names as TensorBoard tags, `a/b`)."""
        if not values:
            return
        if self.folder is not None:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter  # there: open() gave a folder only then

                self.writer = SummaryWriter(log_dir=str(self.folder))
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        if self.mlflow is not None:
            self.mlflow.log({f"{self.prefix}{name}": value for name, value in values.items()}, step)

    # ----- what the training loop, the cascade and the commands record ---------------------------------------
    def epoch(self, phase: str, epoch: int, loss: float, valid: dict, pairs_per_s: float | None = None) -> None:
        """One epoch of `phase`: its mean batch loss, its validation metrics (nested per objective allowed), and
        the training pairs it went through per second (not counting validation)."""
        values = {f"loss/{phase}": loss} | flat(valid, f"valid/{phase}/")
        if pairs_per_s is not None:
            values[f"pairs_per_s/{phase}"] = pairs_per_s
        self.scalars(values, epoch)

    def pruned(self, phase: str, stage: int, valid: dict, ownership: dict[str, dict[int, float]]) -> None:
        """After the prune of `stage`: each unit group's share per owner, and the pruned model's validation."""
        shares = {f"ownership/{group}/{'free' if owner == 0 else f'stage-{owner}'}": share
                  for group, owners in ownership.items() for owner, share in owners.items()}  # fmt: skip
        self.scalars(shares | flat(valid, f"valid/{phase}/"), stage)

    def test(self, metrics: dict) -> None:
        """The test metrics at the end of the run (per objective)."""
        self.scalars(flat(metrics, "test/"), 0)

    def artifact(self, folder: str | Path, name: str = "model") -> None:
        """A saved folder (the model) into the MLflow run; event files need no copy, they are in the run folder."""
        if self.mlflow is not None:
            self.mlflow.artifact(Path(folder), name)

    def close(self, failed: bool = False) -> None:
        for part in self.children:
            part.close(failed)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.mlflow is not None and not self.prefix:  # the root ends the run its children share
            self.mlflow.end(failed)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close(failed=kind is not None)
