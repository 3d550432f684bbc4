"""Building the service, in one process or in several (`csmf serve --workers N`).

With N workers uvicorn starts N processes on one listening socket and each builds its own service here
(`app_from_env`, from the settings the parent put in CSMF_SERVE_SPEC). The artifact's arrays are read-only
memory maps, so the item and user vectors sit once in the page cache whatever N is; an HNSW graph is built
once by the parent and mapped by every worker. Each worker holds its own index, so with more than one worker
items cannot be added or removed over HTTP (the workers would disagree): serve.allow_writes is refused.
The workers write their metrics to one temporary folder (PROMETHEUS_MULTIPROC_DIR), so GET /metrics on any of
them counts all. SIGTERM to the parent is passed on to every worker (uvicorn's supervisor), each answers the
requests it holds for up to serve.drain_seconds, and the parent waits for them before it removes the folder.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from csmf.config import ConfigError, ServeConfig

logger = logging.getLogger(__name__)

SPEC_ENV = "CSMF_SERVE_SPEC"
WRITE_TOKEN_ENV = "CSMF_WRITE_TOKEN"  # the bearer token of the write routes (or serve.write_token_file)
MIN_TOKEN_CHARS = 16
MAKE_TOKEN = "openssl rand -hex 32"


def write_token(s: ServeConfig, environ: dict[str, str] | None = None) -> str | None:
    """The bearer token POST /items and DELETE /items/{id} require, from serve.write_token_file or the
    CSMF_WRITE_TOKEN variable (one of the two); None when serve.allow_writes is off (those routes then answer
    403). A ConfigError names what is missing or wrong and the fix, before the artifact is read."""
    environ = os.environ if environ is None else environ
    if not s.allow_writes:
        if s.write_token_file:
            raise ConfigError(f"serve.write_token_file (--write-token-file) {s.write_token_file!r} is read only "
                              "when item writes are on: add --allow-writes (serve.allow_writes), or drop "
                              "--write-token-file")  # fmt: skip
        return None
    if s.workers > 1:
        raise ConfigError(f"serve.allow_writes (--allow-writes) with serve.workers {s.workers}: each worker holds its "
                          "own index, so items cannot change; serve with --workers 1 to change items")  # fmt: skip
    from_env = environ.get(WRITE_TOKEN_ENV)
    if s.write_token_file and from_env is not None:
        raise ConfigError(f"the write token is given twice, in {WRITE_TOKEN_ENV} and in serve.write_token_file "
                          f"{s.write_token_file!r}: unset {WRITE_TOKEN_ENV} or drop --write-token-file")  # fmt: skip
    if s.write_token_file:
        where = f"serve.write_token_file {s.write_token_file}"
        try:
            lines = Path(s.write_token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{where}: cannot read the write token ({err}); give a readable file (mode 600) "
                              "whose first line is the token") from None  # fmt: skip
        token = lines[0].strip() if lines else ""
    elif from_env is not None:
        where, token = f"the environment variable {WRITE_TOKEN_ENV}", from_env.strip()
    else:
        raise ConfigError(f"serve.allow_writes (--allow-writes) is on but no write token is given: set "
                          f"{WRITE_TOKEN_ENV}, or give --write-token-file FILE (serve.write_token_file) whose first "
                          f"line is the token; make one with {MAKE_TOKEN}")  # fmt: skip
    if len(token) < MIN_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
        raise ConfigError(f"{where}: the write token must be {MIN_TOKEN_CHARS} or more visible ASCII characters, no "
                          f"spaces (it has {len(token)}); make one with {MAKE_TOKEN}")  # fmt: skip
    return token


def build_service(
    artifact: str | Path, s: ServeConfig, mmap: bool = False, hnsw_file: str | None = None, multiprocess: bool = False
):
    """The ASGI app serving `artifact` with the settings `s`; `hnsw_file`: a graph HnswIndex.save wrote;
    `multiprocess`: a worker among several, whose metrics go to PROMETHEUS_MULTIPROC_DIR (csmf.serving.metrics)."""
    from csmf.serving.app import create_app
    from csmf.serving.artifact import load_artifact
    from csmf.serving.index import build_index
    from csmf.serving.serve import Recommender, ServeLimits

    art = load_artifact(artifact, mmap=mmap)
    settings = index_settings(s)
    if hnsw_file is None and s.index == "hnsw" and s.hnsw_file:
        hnsw_file = hnsw_graph(art, s, Path(s.hnsw_file))
    index = _read_graph(hnsw_file, settings, mmap) if hnsw_file else build_index(art.item_vectors, settings)
    limits = ServeLimits(max_ids=s.max_ids, max_results=s.max_results, max_body_bytes=s.max_body_bytes)
    recommender = Recommender(art, index, s.fallback == "popularity", limits, mutable=s.workers == 1)
    return create_app(recommender, write_token(s), multiprocess)


def settled(app):
    """`app`, about to serve in this process until it ends: what is loaded by now (the artifact, the libraries) is
    kept out of the garbage collector's full passes, which otherwise walk all of it (100-280 ms each on JD, every
    request held meanwhile) as often as large batch answers allocate (issue 27)."""
    gc.collect()
    gc.freeze()
    return app


def _read_graph(hnsw_file: str, settings, mmap: bool):
    """The HNSW index in `hnsw_file`; a file faiss cannot read is a ConfigError naming it, never a traceback."""
    from csmf.serving.index import HnswIndex

    try:
        return HnswIndex.load(hnsw_file, settings, mapped=mmap)
    except (RuntimeError, OSError, ValueError, KeyError, TypeError) as err:  # faiss raises RuntimeError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"HNSW graph {hnsw_file}: cannot be read ({first}); delete it and its .json side file, "
                          "and csmf serve builds it again") from None  # fmt: skip


def hnsw_graph(art, s: ServeConfig, where: Path, log=logger.info) -> str:
    """`where`, holding an HNSW graph of this artifact's item vectors with these settings: the one already there
    when its side file says it was built from the same vectors (their sha256) and M and the file matches the
    sha256 recorded for it, else one built now and written there (a cache: a damaged or foreign one is rebuilt,
    with a line saying why)."""
    from csmf.serving.index import HnswIndex

    settings = index_settings(s)
    key = {"item_vectors_sha256": art.manifest["files"]["item_vectors.npy"], "hnsw_m": settings.hnsw_m,
           "ef_construction": settings.hnsw_ef_construction}  # fmt: skip
    problem = HnswIndex.reuse_problem(where, key)
    if problem is None:
        log(f"HNSW graph: {where} (built from these item vectors; its sha256 checked)")
        return str(where)
    log(f"HNSW graph: {problem}; building it over {len(art.item_ids):,} items, then writing {where}")
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
    return settled(build_service(spec["artifact"], ServeConfig(**spec["serve"]), mmap=True,
                                 hnsw_file=spec["hnsw_file"], multiprocess=True))  # fmt: skip


def run(artifact: str | Path, s: ServeConfig, log=logger.info, log_config: dict | None = None) -> None:
    """Serve until stopped: in this process (workers = 1), else in `s.workers` processes. `log_config`: uvicorn's
    logging dict (`csmf serve` gives csmf.cli_output.uvicorn_log_config), applied in every worker; None: uvicorn's."""
    import uvicorn

    if s.hnsw_file and s.index != "hnsw":
        raise ConfigError(f"serve.hnsw_file (--hnsw-file) {s.hnsw_file!r} is read by the hnsw index only, and "
                          f"serve.index is {s.index!r}: add --index hnsw, or drop --hnsw-file")  # fmt: skip

    write_token(s)  # a missing or weak token stops the command now, before the artifact is read
    # the C HTTP parser and event loop when installed (they are dependencies; a platform without them still runs)
    fast = {"http": "httptools", "loop": "uvloop"} if _installed("httptools", "uvloop") else {}
    # SIGTERM (to this process; with workers the parent sends it on to each): stop accepting, answer what is in
    # flight for up to serve.drain_seconds, then cancel the rest
    options = dict(host=s.host, port=s.port, log_level="warning", access_log=False,
                   timeout_graceful_shutdown=s.drain_seconds, **fast)  # fmt: skip
    if log_config is not None:
        options["log_config"] = log_config
    if s.workers == 1:
        app = settled(build_service(artifact, s))
        log(f"serving {app.recommender.n_items:,} items ({s.index} index) on http://{s.host}:{s.port}")
        if s.allow_writes:
            log("POST /items and DELETE /items/{id} are on, for requests with the write token (Authorization: Bearer)")
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
        # each worker builds its service at start, and uvicorn starts a failed worker again, forever: build it once
        # here first (and drop it), so a damaged artifact or graph ends this command (rc 2) before any worker starts
        build_service(artifact, s, mmap=True, hnsw_file=hnsw_file)
        os.environ[SPEC_ENV] = json.dumps({"artifact": str(artifact), "serve": asdict(s), "hnsw_file": hnsw_file})
        log(f"serving with {s.workers} worker processes ({s.index} index, vectors memory-mapped) on "
            f"http://{s.host}:{s.port}")  # fmt: skip
        # the workers' metrics files, in a folder of this run only (removed with it at exit): set before they start,
        # since prometheus-client reads it when a worker first imports it (the check above ran without it)
        from csmf.serving.metrics import MULTIPROC_ENV

        before = os.environ.get(MULTIPROC_ENV)
        os.environ[MULTIPROC_ENV] = str(Path(tmp) / "metrics")
        (Path(tmp) / "metrics").mkdir()
        try:
            uvicorn.run("csmf.serving.workers:app_from_env", factory=True, workers=s.workers, **options)
        finally:  # as it was, for a caller that goes on in this process (the tests)
            if before is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = before


def _installed(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)
