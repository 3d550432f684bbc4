"""`csmf export`: a trained model, or the run folder `csmf train` wrote, -> a serving artifact (csmf.serving.artifact).

The model says what it serves (CSMF.served_arrays: vectors, owners, seen items, popularity, ids and towers);
this module writes that in the artifact's format. A run folder is exported from the model it saved.
"""

from __future__ import annotations

import logging
from pathlib import Path

from csmf.checkpoints import load_checkpoint
from csmf.config import ConfigError
from csmf.models.csmf import CSMF
from csmf.runfolder import last_checkpoints
from csmf.serving.artifact import ArtifactError, write_artifact

logger = logging.getLogger(__name__)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    default_weights: dict[str, float] | None = None,
    log=logger.info,
    overrides: tuple[str, ...] = (),
    config_file: str | None = None,
) -> Path:
    """Write the serving artifact of a finished `csmf train` run folder, from the model it saved (no data
    loading, no trainer). `overrides`/`config_file` (--set/--config of csmf export) are refused: a saved model is
    exported as it was trained."""
    run_dir = Path(run_dir)
    saved = run_dir / "model"
    if overrides or config_file:
        raise ConfigError(f"{run_dir}: a run is exported as it was trained: --config/--set do not apply to "
                          "csmf export (give them to csmf train)")  # fmt: skip
    if not (saved / "model.pt").exists():
        if (run_dir / "checkpoints").is_dir() and (run_dir / "config.toml").exists():
            for last in last_checkpoints(run_dir / "checkpoints"):  # a damaged one says so, not "finish training"
                load_checkpoint(last)
            raise ArtifactError(
                f"{run_dir}: this run folder has checkpoints but no saved model (it was written by an older csmf, or "
                f"training has not finished). Finish or re-save it, then export: csmf train --config "
                f"{run_dir / 'config.toml'} --out {run_dir} (it resumes from the checkpoints and saves the model); "
                f"csmf export --run {run_dir} --out {out}"
            )
        raise ArtifactError(f"{run_dir}: no saved model (model/model.pt); give the folder `csmf train --out` wrote")
    return export_model(CSMF.load(saved), out, default_weights, source={"run_dir": str(run_dir)}, log=log)


def export_model(
    model: CSMF, out: str | Path, default_weights: dict[str, float] | None = None, source: dict | None = None,
    log=logger.info,
) -> Path:  # fmt: skip
    """Write the serving artifact of a fitted (or loaded) CSMF model: its item vectors, every user's vector
    from the training history it holds, the seen items, popularity, ids and towers."""
    served = model.served_arrays()
    stages = served.pop("stages")
    weights = default_weights or {s: 1.0 for s in stages}
    unknown = [s for s in weights if s not in stages]
    if unknown:
        raise ArtifactError(f"default weights name {unknown}, not stages of {served['dataset']} {stages}")
    path = write_artifact(
        out, stages=stages, default_weights=weights,
        source={**(source or {}), "dataset": served.pop("dataset"), "seed": model.cfg.seed}, **served,
    )  # fmt: skip
    n_items, dim = served["item_vectors"].shape
    log(f"wrote {path}: {n_items:,} item vectors of dimension {dim}, {len(served['user_vectors']):,} users")
    return path
