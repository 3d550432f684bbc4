"""Building the service, in one process or in several (`csmf serve --workers N`).

With N workers uvicorn starts N processes on one listening socket and each builds its own service here
(`app_from_env`, from the settings the parent put in CSMF_SERVE_SPEC). The artifact's arrays are read-only
memory maps, so the item and user vectors sit once in the page cache whatever N is; an HNSW graph is built
once by the parent and mapped by every worker. Each worker holds its own index, so with more than one worker
items cannot be added or removed over HTTP (the workers would disagree): those routes answer 409.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from csmf.config import ConfigError, ServeConfig

SPEC_ENV = "CSMF_SERVE_SPEC"


def build_service(artifact: str | Path, s: ServeConfig, mmap: bool = False, hnsw_file: str | None = None):
    """The ASGI app serving `artifact` with the settings `s`; `hnsw_file`: a graph HnswIndex.save wrote."""
    from csmf.serving.app import create_app
    from csmf.serving.artifact import load_artifact
    from csmf.serving.index import HnswIndex, build_index
    from csmf.serving.serve import Recommender, ServeLimits

    art = load_artifact(artifact, mmap=mmap)
    settings = index_settings(s)
    if hnsw_file is None and s.index == "hnsw" and s.hnsw_file:
        hnsw_file = hnsw_graph(art, s, Path(s.hnsw_file))
    index = HnswIndex.load(hnsw_file, settings, mapped=mmap) if hnsw_file else build_index(art.item_vectors, settings)
    limits = ServeLimits(max_ids=s.max_ids, max_results=s.max_results, max_body_bytes=s.max_body_bytes)
    recommender = Recommender(art, index, s.fallback == "popularity", limits, mutable=s.workers == 1)
    return create_app(recommender)


def hnsw_graph(art, s: ServeConfig, where: Path, log=print) -> str:
    """`where`, holding an HNSW graph of this artifact's item vectors with these settings: the one already there
    when it was built from the same vectors (their sha256) and M, else one built now and written there."""
    from csmf.serving.index import HnswIndex

    settings = index_settings(s)
    key = {"item_vectors_sha256": art.manifest["files"]["item_vectors.npy"], "hnsw_m": settings.hnsw_m,
           "ef_construction": settings.hnsw_ef_construction}  # fmt: skip
    if HnswIndex.built_from(where) == key:
        log(f"HNSW graph: {where} (built from these item vectors)")
        return str(where)
    log(f"HNSW graph: building it over {len(art.item_ids):,} items, then writing {where}")
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        HnswIndex(art.item_vectors, settings).save(where, built_from=key)
    except (OSError, RuntimeError) as err:  # faiss reports a file it cannot write as a RuntimeError
        raise ConfigError(f"serve.hnsw_file {where}: cannot write the graph there ({err})") from None
    return str(where)


def index_settings(s: ServeConfig):
    from csmf.serving.index import IndexSettings

    return IndexSettings(kind=s.index, hnsw_m=s.hnsw_m, hnsw_ef_search=s.ef_search, milvus_uri=s.milvus_uri,
                         threads=s.threads)  # fmt: skip


def app_from_env():
    """uvicorn's factory in each worker process."""
    spec = json.loads(os.environ[SPEC_ENV])
    return build_service(spec["artifact"], ServeConfig(**spec["serve"]), mmap=True, hnsw_file=spec["hnsw_file"])


def run(artifact: str | Path, s: ServeConfig, log=print) -> None:
    """Serve until stopped: in this process (workers = 1), else in `s.workers` processes."""
    import uvicorn

    # the C HTTP parser and event loop when installed (they are dependencies; a platform without them still runs)
    fast = {"http": "httptools", "loop": "uvloop"} if _installed("httptools", "uvloop") else {}
    options = dict(host=s.host, port=s.port, log_level="warning", access_log=False, **fast)
    if s.workers == 1:
        app = build_service(artifact, s)
        log(f"serving {app.recommender.n_items:,} items ({s.index} index) on http://{s.host}:{s.port}")
        uvicorn.run(app, **options)
        return
    if s.index == "milvus":
        raise ConfigError("serve.workers > 1 takes the exact or hnsw index; milvus-lite is one process's database "
                          "(a Milvus server scales by itself: serve it with one worker per machine)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="csmf-serve-") as tmp:
        hnsw_file = None
        if s.index == "hnsw":  # built once here (or read from serve.hnsw_file), mapped by every worker
            from csmf.serving.artifact import load_artifact

            where = Path(s.hnsw_file) if s.hnsw_file else Path(tmp) / "items.hnsw"
            hnsw_file = hnsw_graph(load_artifact(artifact, mmap=True), s, where, log)
        os.environ[SPEC_ENV] = json.dumps({"artifact": str(artifact), "serve": asdict(s), "hnsw_file": hnsw_file})
        log(f"serving with {s.workers} worker processes ({s.index} index, vectors memory-mapped) on "
            f"http://{s.host}:{s.port}")  # fmt: skip
        uvicorn.run("csmf.serving.workers:app_from_env", factory=True, workers=s.workers, **options)


def _installed(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)
