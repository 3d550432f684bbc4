"""Load the dataset a config names: the JD data (a folder or the packaged copy), a fresh simulation, or a
generic log file, split by the config's protocol."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from csmf.config import NAMED_DATASETS, Config, ConfigError
from csmf.data.context import wanted
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
    if d.cache_dir:
        return _load_cached(cfg, progress)
    if d.dataset == "jd":
        stages = d.stages or ("view", "purchase")
        return load_jd(d.jd_dir or None, stages, d.test_frac, d.valid_frac, d.split_seed)
    if d.dataset in PUBLIC and not d.data_dir:
        raise ConfigError(f"data.data_dir: give the folder holding the {PUBLIC[d.dataset]} files (--data-dir DIR)")
    if d.dataset == "aliccp":
        from csmf.data.aliccp import load_aliccp

        return load_aliccp(d.data_dir, d.valid_frac, d.split_seed, d.context_features)  # the files are the split
    _check_context(d)
    if d.dataset == "aliexpress":
        from csmf.data.aliexpress import load_aliexpress

        return load_aliexpress(d.data_dir, d.valid_frac, d.split_seed, d.user_features)
    if d.dataset in ("kuairand", "tenrec"):
        from csmf.data.kuairand import load_kuairand
        from csmf.data.tenrec import load_tenrec

        if d.dataset == "kuairand":
            log = load_kuairand(d.data_dir, d.kuairand_conversion, d.context_features)
        else:
            log = load_tenrec(d.data_dir, d.tenrec_conversion, d.tenrec_file)
        return split_log(log, d.test_frac, d.valid_frac, d.split_seed, d.split, name=d.dataset)
    if d.dataset == "sim":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "sim.parquet"
            simulate(cfg.sim, path, progress=progress)
            return _load_log_dataset(cfg, path, "sim")
    return _load_log_dataset(cfg, Path(d.dataset), dataset_name(d.dataset))


def _check_context(d) -> None:
    if d.dataset in ("aliexpress", "tenrec") and d.context_features:
        raise ConfigError(f"data.context_features: the {PUBLIC[d.dataset]} loader reads no per-row context")


def _sim_context(cfg: Config) -> tuple[str, ...]:
    """The simulator's context: its scenario column, written when sim.scenarios > 0."""
    return ("scenario",) if cfg.sim.scenarios else ()


def _load_log_dataset(cfg: Config, path: Path, name: str) -> CascadeData:
    d = cfg.data
    # a generic log names its context columns; the simulator's is its scenario column
    context = wanted(d.context_features, _sim_context(cfg) if name == "sim" else ())
    log = load_log(path, d.stages, d.user_col, d.item_col, d.timestamp_col, d.user_features, d.item_features, context)
    return split_log(log, d.test_frac, d.valid_frac, d.split_seed, d.split, name=name)


def _load_cached(cfg: Config, progress: bool) -> CascadeData:
    """The dataset through its Parquet cache (csmf.data.cache): converted once, rebuilt when the source changes;
    with train.stream only the evaluated users' rows are held in memory and training streams the rest."""
    d = cfg.data
    cache = convert(cfg, progress)
    name = cache.manifest["name"]

    def sample(count: int) -> np.ndarray:  # the held-out users evaluated: `count` of them, seeded (0 = all)
        users = cache.held_out_users()
        if count and len(users) > count:
            users = np.sort(np.random.default_rng([d.split_seed, 9]).choice(users, count, replace=False))
        return users

    if not cfg.train.stream:
        data = cache.cascade(name)
        if d.test_users:
            kept = sample(d.test_users)
            keep = sp.diags(np.isin(np.arange(data.n_users), kept).astype(np.float32), format="csr")
            data.test = {s: _rows_of(keep, m) for s, m in data.test.items()}
            data.report.notes.append(f"test pairs of {len(kept):,} held-out users kept (data.test_users)")
        return data
    users = sample(d.stream_eval_users)
    data = cache.cascade(name, users=users)
    data.report.notes.append(f"streamed training; {len(users):,} held-out users evaluated (data.stream_eval_users)")
    data.stream = cache
    return data


def _rows_of(keep: sp.csr_matrix, matrix: sp.csr_matrix) -> sp.csr_matrix:
    """`matrix` with only the rows `keep` (a 0/1 diagonal) holds, shape and dtype kept."""
    out = (keep @ matrix).astype(matrix.dtype).tocsr()
    out.eliminate_zeros()
    return out


def convert(cfg: Config, progress: bool = False):
    """The Parquet cache of the dataset `cfg` names, in data.cache_dir: reused when it matches its source,
    converted otherwise (csmf.data.cache.Cache)."""
    from csmf.data.cache import ensure_cache
    from csmf.data.sources import log_source

    d = cfg.data
    if not d.cache_dir:
        raise ConfigError("data.cache_dir: give the folder of the Parquet cache (--set data.cache_dir=DIR)")
    folder = Path(d.cache_dir).expanduser()
    if d.dataset in PUBLIC and not d.data_dir:
        raise ConfigError(f"data.data_dir: give the folder holding the {PUBLIC[d.dataset]} files (--data-dir DIR)")
    _check_context(d)
    if d.dataset == "aliccp":
        from csmf.data.aliccp import aliccp_source

        source = aliccp_source(d.data_dir, d.valid_frac, d.split_seed, d.context_features)
    elif d.dataset == "aliexpress":
        from csmf.data.aliexpress import aliexpress_source

        source = aliexpress_source(d.data_dir, d.valid_frac, d.split_seed, d.user_features)
    elif d.dataset == "tenrec":
        from csmf.data.tenrec import tenrec_source

        source = tenrec_source(d.data_dir, d.tenrec_conversion, d.tenrec_file, d.test_frac, d.valid_frac, d.split_seed)
    elif d.dataset == "kuairand":
        from csmf.data.kuairand import kuairand_source

        source = kuairand_source(d.data_dir, d.kuairand_conversion, d.test_frac, d.valid_frac, d.split_seed,
                                 d.context_features)  # fmt: skip
    elif d.dataset == "sim":
        path = _simulated_log(cfg, folder.with_name(folder.name + "-source"), progress)
        source = log_source(path, ("exposure", "click", "conversion"), "user_id", "item_id", d.test_frac,
                            d.valid_frac, d.split_seed, "sim")  # fmt: skip
        source.context = wanted(d.context_features, _sim_context(cfg))
        source.context_required = d.context_features is not None
    elif d.dataset in NAMED_DATASETS:
        raise ConfigError(f"data.cache_dir: {d.dataset} loads in memory; the cache converts Ali-CCP, AliExpress, "
                          "KuaiRand, Tenrec, the simulator and generic logs")  # fmt: skip
    else:
        source = log_source(Path(d.dataset), d.stages, d.user_col, d.item_col, d.test_frac, d.valid_frac,
                            d.split_seed, dataset_name(d.dataset))  # fmt: skip
        source.context, source.context_required = d.context_features or (), True
    return ensure_cache(source, folder, progress=progress)


def _simulated_log(cfg: Config, folder: Path, progress: bool) -> Path:
    """The simulator's log for `cfg.sim`, written once beside the cache (rewritten when cfg.sim changes)."""
    import json
    from dataclasses import asdict

    folder.mkdir(parents=True, exist_ok=True)
    path, settings = folder / "sim.parquet", folder / "sim.json"
    wanted = json.dumps(asdict(cfg.sim), sort_keys=True)
    if not (path.exists() and settings.exists() and settings.read_text() == wanted):
        simulate(cfg.sim, path, progress=progress)
        settings.write_text(wanted)
    return path
