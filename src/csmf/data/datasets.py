"""Load the dataset a config names: the JD data (a folder or the packaged copy), a fresh simulation, or a
generic log file, split by the config's protocol."""

from __future__ import annotations

import tempfile
from pathlib import Path

from csmf.config import NAMED_DATASETS, Config, ConfigError
from csmf.data.jd import load_jd
from csmf.data.logtable import load_log
from csmf.data.schema import CascadeData
from csmf.data.simulate import simulate
from csmf.data.split import split_log

PUBLIC = {"aliccp": "Ali-CCP", "aliexpress": "AliExpress", "kuairand": "KuaiRand", "tenrec": "Tenrec"}


def dataset_name(spec: str) -> str:
    return spec if spec in NAMED_DATASETS else Path(spec).name.split(".")[0]


def load_dataset(cfg: Config, progress: bool = False) -> CascadeData:
    """The CascadeData that `cfg.data.dataset` names: "jd", "sim" (simulated afresh), or a log path."""
    d = cfg.data
    if d.dataset == "jd":
        stages = d.stages or ("view", "purchase")
        return load_jd(d.jd_dir or None, stages, d.test_frac, d.valid_frac, d.split_seed)
    if d.dataset in PUBLIC and not d.data_dir:
        raise ConfigError(f"data.data_dir: give the folder holding the {PUBLIC[d.dataset]} files (--data-dir DIR)")
    if d.dataset == "aliccp":
        from csmf.data.aliccp import load_aliccp

        return load_aliccp(d.data_dir, d.valid_frac, d.split_seed)  # the release's files are the split
    if d.dataset == "aliexpress":
        from csmf.data.aliexpress import load_aliexpress

        return load_aliexpress(d.data_dir, d.valid_frac, d.split_seed, d.user_features)
    if d.dataset in ("kuairand", "tenrec"):
        from csmf.data.kuairand import load_kuairand
        from csmf.data.tenrec import load_tenrec

        if d.dataset == "kuairand":
            log = load_kuairand(d.data_dir, d.kuairand_conversion)
        else:
            log = load_tenrec(d.data_dir, d.tenrec_conversion, d.tenrec_file)
        return split_log(log, d.test_frac, d.valid_frac, d.split_seed, d.split, name=d.dataset)
    if d.dataset == "sim":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "sim.parquet"
            simulate(cfg.sim, path, progress=progress)
            return _load_log_dataset(cfg, path, "sim")
    return _load_log_dataset(cfg, Path(d.dataset), dataset_name(d.dataset))


def _load_log_dataset(cfg: Config, path: Path, name: str) -> CascadeData:
    d = cfg.data
    log = load_log(path, d.stages, d.user_col, d.item_col, d.timestamp_col, d.user_features, d.item_features)
    return split_log(log, d.test_frac, d.valid_frac, d.split_seed, d.split, name=name)
