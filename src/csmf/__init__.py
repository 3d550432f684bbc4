"""csmf: multi-objective embedding-based retrieval with Cascaded Selective Mask Fine-Tuning.

The public API (imported on first use, so `import csmf` stays light):

    from csmf import CSMF, Config, evaluate, export_model, load_dataset, override

- `Config`, `override(cfg, ["section.field=value", ...])`, `load_config(path)`: the one typed config;
- `load_dataset(cfg)`: the dataset `cfg.data.dataset` names ("jd", "sim" or a log file), split;
- `load_log(path)`: read your own CSV/Parquet log (then `split_log`);
- `CSMF(cfg).fit(data)`, `.score(users, stage)`, `.score_fused(users, weights)`,
  `.user_vectors(users, weights)` / `.item_vectors()`, `.save(folder)`, `CSMF.load(folder)`;
- `evaluate(model, data)`: full-catalogue Recall / NDCG per objective on the test split;
- `load_model(folder)`: any model a `.save(folder)` wrote (CSMF, multi-task towers, ALS, item-kNN, EASE,
  popularity), scoring bit-identically;
- `export_model(model, folder)`: the serving artifact `csmf serve --artifact folder` serves;
- `extend_model(model, data, stage)`: the model grown by one objective, the others unchanged (`csmf extend`);
- `refresh_model(run, data)`: a finished run warm-started on new data (`csmf train --init-from`).
"""

import os
from importlib import import_module, metadata

# OpenMP threads that wait for work spin by default; on a machine whose cores are busy with something else
# (a load generator, another job) that spinning turned a training step ~37x slower and one faiss query from
# 0.07 ms into 32 ms (issue 17). Passive waiting, unless the caller chose: set here, on the first csmf import,
# before torch or faiss can start OpenMP (a process that loaded them earlier keeps its own policy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = metadata.version("csmf")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

_API = {
    "Config": "csmf.config",
    "override": "csmf.config",
    "load_config": "csmf.config",
    "load_dataset": "csmf.data.datasets",
    "load_log": "csmf.data.logtable",
    "split_log": "csmf.data.split",
    "CSMF": "csmf.models.csmf",
    "evaluate": "csmf.evaluation",
    "export_model": "csmf.serving.export",
    "load_model": "csmf.models",
    "extend_model": "csmf.extend",
    "refresh_model": "csmf.refresh",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'csmf' has no attribute {name!r}")
