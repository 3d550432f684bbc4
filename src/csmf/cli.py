"""The `csmf` command: each subcommand maps its flags onto the Config and calls one library function."""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from csmf import __version__
from csmf.checkpoints import CheckpointError
from csmf.cli_output import FORMATS, LEVELS, cli_logging, uvicorn_log_config
from csmf.config import (
    Config,
    ConfigError,
    ServeConfig,
    absolute_data_paths,
    load_config,
    override,
    read_leaves,
    with_values,
)
from csmf.data.errors import DataError
from csmf.fusion import clip
from csmf.rules import check_training, fit_to_size
from csmf.serving.artifact import ArtifactError

logger = logging.getLogger(__name__)  # the command's own lines; csmf.cli_output shows them


def _log_level_flag(parser: argparse.ArgumentParser, default: str | None) -> None:
    # before the command (csmf --log-level warning train) or after it; given after, it wins
    parser.add_argument("--log-level", choices=tuple(LEVELS), default=argparse.SUPPRESS if default is None else default,
                        help="the least severe log lines shown: debug, info (default: all the command's lines), "
                             "warning (notes and errors only), error")  # fmt: skip


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="TOML file with config sections ([data], [als], ...), or a shipped preset: mlp"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set als.factors=64,128 (repeatable)",
    )
    parser.add_argument("--seed", type=int, help="model seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _log_level_flag(parser, None)


def _device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "auto"),
        help="where CSMF trains: cpu (default), cuda (the MLP encoder: --config mlp), auto = cuda when present",
    )  # fmt: skip


def _data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", help="jd, sim, aliccp, aliexpress, kuairand, tenrec, or a generic log's path (.csv/.parquet)"
    )
    parser.add_argument("--stages", help="stage columns / names in cascade order, comma-separated")
    parser.add_argument("--data-dir", help="folder of a public dataset's files (aliccp, aliexpress, kuairand, tenrec)")


def _config(args: argparse.Namespace, presets: tuple[str, ...] = (), base: Config | None = None) -> Config:
    """The command's config: --config (a file or preset) then every flag; `base`: a run's config the flags and only
    the keys --config sets go on (csmf train --init-from)."""
    if base is not None:
        cfg = with_values(base, read_leaves(args.config)) if args.config else base
    else:
        cfg = load_config(args.config) if args.config else Config()
    sets = [*presets, *args.set]  # presets first: the command line wins
    if getattr(args, "dataset", None):
        sets.append(f"data.dataset={args.dataset}")
    if getattr(args, "stages", None):
        sets.append(f"data.stages={args.stages}")
    if getattr(args, "data_dir", None):
        sets.append(f"data.data_dir={args.data_dir}")
    if getattr(args, "models", None):
        sets.append(f"bench.models={args.models}")
    if getattr(args, "device", None):
        sets.append(f"runtime.device={args.device}")
    if getattr(args, "out", None) and args.command == "bench":
        sets.append(f"bench.out_dir={args.out}")
    cfg = override(cfg, sets)
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    return cfg


CLASSICAL = ("popularity", "als", "itemknn", "ease")  # bench models without a neural training config


def cmd_bench(args: argparse.Namespace) -> int:
    from csmf.experiments.bench import run_bench
    from csmf.experiments.suite import QUICK_SETS, run_suite

    if args.quick and not args.suite:
        raise ConfigError("--quick shrinks a suite: use it with --suite paper, scale, extend or refresh")
    if args.suite and (args.models or args.dataset):
        raise ConfigError("--suite runs its own models and datasets: drop --models/--dataset (see bench.suite_*)")
    if args.suite == "refresh":
        from csmf.experiments.refresh_bench import run_refresh

        run_refresh(_config(args), quick=args.quick)
        return 0
    if args.suite == "scale":
        from csmf.experiments.scale import run_scale

        run_scale(_config(args), quick=args.quick)
        return 0
    if args.suite == "extend":
        from csmf.experiments.growth import run_growth

        run_growth(_config(args), quick=args.quick, progress=not args.quiet)
        return 0
    cfg = _config(args, QUICK_SETS if args.quick else ())
    if args.no_tune:  # no search of any kind: the peers' grids and CSMF's candidates alike
        cfg = replace(cfg, bench=replace(cfg.bench, tune=False), select=replace(cfg.select, candidates=()))
    if args.suite:
        run_suite(cfg, args.suite + ("-quick" if args.quick else ""), progress=not args.quiet)
    else:
        if any(m not in CLASSICAL for m in cfg.bench.models):  # a neural model: its config must train
            check_training(fit_to_size(cfg, pinned=_pinned(args, cfg))[0])
        run_bench(cfg, progress=not args.quiet, pinned=_pinned(args, cfg))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from csmf.data.simulate import simulate

    cfg = _config(args)
    sim = cfg.sim
    for flag, name in (("users", "n_users"), ("items", "n_items"), ("exposures", "exposures_per_user")):
        if getattr(args, flag) is not None:
            sim = replace(sim, **{name: getattr(args, flag)})
    if args.seed is not None:
        sim = replace(sim, seed=args.seed)
    start = time.perf_counter()
    if args.layout != "log" and args.period != 1:
        raise ConfigError("--period 2 writes a generic log: drop --layout")
    if args.layout != "log":
        from csmf.data.simulate import simulate_layout

        counts = simulate_layout(sim, args.layout, Path(args.out), progress=not args.quiet)
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        logger.info(f"wrote {args.out} in the {args.layout} layout ({', '.join(p.name for p in counts['files'])}): "
                    f"{counts['rows']:,} rows in {seconds:.1f}s ({counts['rows'] / max(seconds, 1e-9):,.0f} rows/s); "
                    f"peak memory {peak_mb:,.0f} MB")  # fmt: skip
        return 0
    if args.period == 2:  # the same world 30 days later: new users and items after the first period's ids
        from csmf.data.simulate import simulate_next_period

        new_users = sim.n_users // 4 if args.new_users is None else args.new_users
        new_items = sim.n_items // 4 if args.new_items is None else args.new_items
        counts = simulate_next_period(sim, args.out, new_users, new_items, progress=not args.quiet)
    else:
        counts = simulate(sim, args.out, progress=not args.quiet)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logger.info(
        f"wrote {args.out}: {counts['rows']:,} rows (exposure {counts['exposure']:,}, click {counts['click']:,}, "
        f"conversion {counts['conversion']:,}) in {seconds:.1f}s; peak memory {peak_mb:,.0f} MB"
    )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from csmf.data.datasets import load_dataset
    from csmf.data.schema import leak_violations

    cfg = _config(args)
    if args.convert:
        from csmf.data.datasets import convert

        start = time.perf_counter()
        m = convert(cfg, progress=not args.quiet).manifest
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        splits = ", ".join(f"{k} {v:,}" for k, v in m["rows_per_split"].items())
        logger.info(f"cache {cfg.data.cache_dir}: {m['rows']:,} rows ({splits}), {m['n_users']:,} users x "
                    f"{m['n_items']:,} items; converted in {m['seconds']:.1f}s ({m['rows_per_second']:,} rows/s); "
                    f"this call {time.perf_counter() - start:.1f}s, peak memory {peak_mb:,.0f} MB")  # fmt: skip
        for name, f in m["features"].items():
            logger.info(f"  feature {name}: {f['side']}, {f['size']:,} codes" + (" (hashed)" if f["hashed"] else "")
                        + (" (bag)" if f.get("bag") else ""))  # fmt: skip
        for note in m["notes"]:
            logger.info(f"  note: {note}")
        return 0
    data = load_dataset(cfg, progress=not args.quiet)
    logger.info(data.summary())
    logger.info(data.report.render())
    problems = leak_violations(data)
    logger.info("leak check: " + ("clean" if not problems else "; ".join(problems)))
    return 1 if problems else 0


def _parse_weights(text: str, stages: tuple[str, ...]) -> dict[str, float]:
    """--weights view:1,purchase:0.5 (the one syntax of csmf.fusion, as over HTTP), checked against the stages."""
    from csmf.fusion import WeightError, check_weights, parse_weights

    try:
        given = parse_weights(text, stages)
        check_weights(given, stages)
    except WeightError as err:
        raise ConfigError(f"--weights {clip(repr(text))}: {err}") from None
    return given


def cmd_train(args: argparse.Namespace) -> int:
    from csmf import distributed

    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: give 1 or more training processes")
    if args.init_from and args.nproc != 1:
        raise ConfigError("--init-from trains in one process: drop --nproc")
    if args.nproc > 1 and not distributed.launched_by_torchrun():
        from csmf.runfolder import RunLock

        RunLock(args.out).check()  # refused here, before N processes start (their rank 0 then takes the lock)
        return distributed.launch(args.nproc, _without_nproc(args.argv))
    refresh = None
    if args.init_from:  # a warm start on new data from a finished run (csmf.refresh): its config, then the flags
        from csmf.refresh import DEFAULT_EPOCHS, Refresh

        if not args.dataset:
            raise ConfigError(f"--init-from {args.init_from}: give the new log with --dataset")
        refresh = Refresh(args.init_from, DEFAULT_EPOCHS if args.refresh_epochs is None else args.refresh_epochs)
    elif args.refresh_epochs is not None:
        raise ConfigError("--refresh-epochs sets a refresh's epochs: give it with --init-from RUN")
    # the run folder's config.toml then works from any directory
    cfg = absolute_data_paths(_config(args, base=refresh.cfg if refresh else None))
    if refresh is not None:
        cfg = refresh.config(cfg)  # refuses settings that change the run's model, before any data loads
        check_training(cfg)
    else:  # a combination that cannot train fails now, before any data loads (defaults the size rules out adapt)
        check_training(fit_to_size(cfg, pinned=_pinned(args, cfg))[0])

    ranks = distributed.init_from_env(distributed.resolve_device(cfg.runtime.device))
    finished = False
    try:
        code = _train(args, cfg, ranks, refresh)
        finished = True
        return code
    finally:
        distributed.shutdown(finished)


def _without_nproc(argv: list[str]) -> list[str]:
    """The train arguments as given, without --nproc (the launched processes are the processes)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _train(args: argparse.Namespace, cfg, ranks, refresh=None) -> int:
    """Train holding the run folder's lock (rank 0 takes it; every rank stops when it is refused)."""
    from csmf import distributed
    from csmf.runfolder import RunLock

    lock, refused = RunLock(args.out), None
    if ranks.main:
        try:
            lock.acquire()
        except CheckpointError as err:
            refused = err
    refused = distributed.broadcast_object(refused)
    if refused is not None:
        raise refused
    try:
        return _train_locked(args, cfg, ranks, refresh)
    finally:
        lock.release()


def _train_locked(args: argparse.Namespace, cfg, ranks, refresh=None) -> int:
    from csmf.data.datasets import load_dataset
    from csmf.train_command import train_and_report

    if cfg.data.cache_dir and ranks.active:  # one process converts (or checks) the cache, then all read it
        from csmf import distributed
        from csmf.data.datasets import convert

        if ranks.main:
            convert(cfg, progress=not args.quiet)
        distributed.barrier()
    data = load_dataset(cfg, progress=not args.quiet and ranks.main)
    if refresh is not None:  # the new data in the run's id maps: known ids keep their rows, new ones follow
        data = refresh.align(data)
    checkpoints = Path(args.out) / "checkpoints"
    if args.overwrite and checkpoints.exists() and ranks.main:
        shutil.rmtree(checkpoints)
        logger.warning(f"--overwrite: removed the checkpoints in {checkpoints}")  # on stderr, beside the notes
    objectives = cfg.cascade.objectives or data.stages  # the objectives the model will serve
    weightings = [_parse_weights(w, objectives) for w in args.weights] or None
    user = None
    if args.user is not None:
        ids = data.user_ids.astype(str) if data.user_ids is not None else None
        matches = [] if ids is None else list(map(int, (ids == args.user).nonzero()[0]))
        if not matches:
            raise ConfigError(f"--user {args.user!r}: no such user id in {data.name}")
        user = matches[0]
    train_and_report(cfg, data, args.out, weightings, user, progress=not args.quiet, pinned=_pinned(args, cfg),
                     refresh=refresh)  # fmt: skip
    return 0


def _pinned(args: argparse.Namespace, cfg) -> dict:
    """The keys the user fixed (csmf.selection.pins): --set keys and a --config file's keys, even where they
    repeat a default, and every value off the defaults."""
    from csmf.config import read_leaves
    from csmf.selection import pins

    named = [a.split("=", 1)[0].strip() for a in args.set]
    if args.config:
        named += list(read_leaves(args.config))
    return pins(cfg, named)


def cmd_export(args: argparse.Namespace) -> int:
    from csmf.serving.artifact import load_artifact
    from csmf.serving.export import export_run

    weights = None
    if args.weights:  # stage names are checked against the run's stages by export
        from csmf.fusion import WeightError, parse_weights

        try:
            weights = parse_weights(args.weights, ("stage",))
        except WeightError as err:
            raise ConfigError(f"--weights {clip(repr(args.weights))}: {err}") from None
    export_run(args.run, args.out, weights, overrides=tuple(args.set), config_file=args.config)
    artifact = load_artifact(args.out)  # what was written reads back (checksums, shapes)
    if args.onnx:
        from csmf.serving.artifact import ONNX_DIR, record_onnx

        try:
            from csmf.serving.onnx import export_onnx

            written = export_onnx(artifact, Path(args.out) / ONNX_DIR)
        except ImportError as err:  # onnx / onnxscript missing: say what to install
            raise ConfigError(f"--onnx: {err}") from None
        record_onnx(args.out, written)  # the manifest vouches for the ONNX files too (name -> sha256)
    return 0


SERVE_FLAGS = ("index", "milvus_uri", "hnsw_m", "ef_search", "hnsw_file", "threads", "workers", "fallback",
               "max_ids", "max_results", "max_body_bytes", "allow_writes", "write_token_file", "host",
               "port")  # fmt: skip


def _serve_config(args: argparse.Namespace) -> Config:
    """--config / --set, then the serve flags given on the command line (they win)."""
    cfg = _config(args)
    flags = [f"serve.{name}={getattr(args, name)}" for name in SERVE_FLAGS if getattr(args, name, None) is not None]
    return override(cfg, flags)


def cmd_serve(args: argparse.Namespace) -> int:
    from csmf.serving.workers import run

    run(args.artifact, _serve_config(args).serve, log_config=uvicorn_log_config(args.log_level, args.log_format))
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from csmf.serving.loadtest import run_loadtest

    s = _serve_config(args).serve
    options = {name: getattr(s, name) for name in ("workers", "threads", "hnsw_m", "ef_search", "hnsw_file") if
               getattr(s, name) != ""}  # fmt: skip
    if args.heavy_clients:
        from csmf.serving.loadtest import run_isolation

        out = args.out or "results/serving/isolation.json"
        run_isolation(args.artifact, args.heavy_clients, args.seconds, s.index, out, serve_options=options)
        return 0
    result = run_loadtest(args.artifact, args.clients, args.requests, args.k, s.index,
                          args.out or "results/serving/loadtest.json",
                          generator=args.generator, seconds=args.seconds, serve_options=options)  # fmt: skip
    return 0 if result["errors"] == 0 else 1


def cmd_trainspeed(args: argparse.Namespace) -> int:
    from csmf.experiments.trainspeed import run_trainspeed

    # the MLP preset unless --config names another (the default graph encoder trains per user, not per pair)
    args.config = args.config or "mlp"
    cfg = _config(args)
    run_trainspeed(args.out, cfg, args.seconds)
    return 0


def cmd_querybench(args: argparse.Namespace) -> int:
    from csmf.serving.querybench import run_querybench

    s = _config(args).serve
    run_querybench(args.out, args.items, args.users, args.artifact, hnsw_m=s.hnsw_m, ef_search=s.ef_search)
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    from csmf.extend import extend_run

    sets = [f"data.{name}={value}" for name, value in (("dataset", args.dataset), ("stages", args.stages),
                                                        ("data_dir", args.data_dir)) if value]  # fmt: skip
    extend_run(args.run, args.stage, sets, progress=not args.quiet)
    return 0


COMMANDS = {
    "loadtest": cmd_loadtest,
    "querybench": cmd_querybench,
    "bench": cmd_bench,
    "simulate": cmd_simulate,
    "data": cmd_data,
    "train": cmd_train,
    "extend": cmd_extend,
    "trainspeed": cmd_trainspeed,
    "export": cmd_export,
    "serve": cmd_serve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csmf", description=__doc__)
    # the installed package's version (importlib.metadata: pyproject.toml's at build time)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _log_level_flag(parser, "info")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="tune, fit and evaluate models; write results/<dataset>/<model>.json")
    _data_flags(bench)
    bench.add_argument(
        "--models",
        help="comma-separated, from popularity, als, itemknn, csmf, csmf-no-cpp, csmf-no-aml, csmf-no-ar, packnet, "
        "naive-ft, csmf-id-only, csmf-no-context, shared-bottom, mmoe, ple, mvke, single-<stage> "
        "(default: popularity,als,itemknn)",
    )
    bench.add_argument("--out", help="results folder (default: results)")
    bench.add_argument("--no-tune", action="store_true", help="skip validation search; use default settings")
    bench.add_argument(
        "--suite", choices=["paper", "scale", "extend", "refresh"],
        help="paper: every model, the ablations and the tau sweep on bench.suite_datasets (jd, sim) over "
        "bench.suite_seeds (0,1,2); writes results/paper/ and reports/paper.md with plots; extend: a trained "
        "cascade grown by one objective (csmf extend) against training it from scratch, reports/extend.md; resumable; "
        "refresh: csmf train --init-from on a second simulated period against training on both periods, one world "
        "per bench.suite_seeds, reports/refresh.md (reruns every fit: it times them)",
    )  # fmt: skip
    bench.add_argument("--quick", action="store_true", help="with --suite: a small smoke version (minutes)")
    _common(bench)
    _device_flag(bench)

    simulate = sub.add_parser("simulate", help="write a simulated exposure -> click -> conversion log")
    simulate.add_argument("--out", required=True, help="output path, .parquet or .csv (a folder with --layout)")
    simulate.add_argument(
        "--layout", default="log", choices=("log", "aliccp", "aliccp-raw", "aliexpress", "kuairand", "tenrec"),
        help="log: one generic log file; otherwise a folder of files in that public dataset's own layout",
    )  # fmt: skip
    simulate.add_argument("--users", type=int, help="number of users")
    simulate.add_argument("--items", type=int, help="number of items")
    simulate.add_argument("--exposures", type=int, help="mean exposures per user")
    simulate.add_argument(
        "--period", type=int, choices=(1, 2), default=1,
        help="2: the same world's next 30 days (the same flags as period 1): every user again, then --new-users "
        "new users and --new-items new items with ids after the first period's (csmf train --init-from)",
    )  # fmt: skip
    simulate.add_argument("--new-users", type=int, help="--period 2: new users (default: a quarter of --users)")
    simulate.add_argument("--new-items", type=int, help="--period 2: new items (default: a quarter of --items)")
    _common(simulate)

    train = sub.add_parser("train", help="train CSMF into a run folder (resumable), evaluate, show a user's top-10")
    _data_flags(train)
    train.add_argument(
        "--out", default="runs/csmf", help="run folder: config, checkpoints, metrics (default runs/csmf)"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="discard the checkpoints already in --out instead of resuming"
    )
    train.add_argument(
        "--weights", action="append", default=[], metavar="STAGE:W,...",
        help="objective weights of one demo query, e.g. view:1,purchase:0.2 (repeatable; default: two scenarios)",
    )  # fmt: skip
    train.add_argument("--user", help="original user id for the demo (default: an active test user)")
    train.add_argument(
        "--nproc", type=int, default=1,
        help="training processes on this machine, launched with torchrun (DDP: gloo on CPU, nccl on CUDA); "
        "the same run folder as one process. Several machines: torchrun -m csmf.torchrun_entry (README)",
    )  # fmt: skip
    train.add_argument(
        "--init-from", metavar="RUN",
        help="refresh the finished run in RUN on --dataset (new data): its config (without its distillation teacher "
        "unless --set train.distill=...), model and ownership, id maps extended, each stage fine-tuned for "
        "--refresh-epochs; settings that change the model are refused",
    )  # fmt: skip
    train.add_argument("--refresh-epochs", type=int, metavar="N",
                       help="with --init-from: epochs each stage fine-tunes for (default 4)")  # fmt: skip
    _common(train)
    _device_flag(train)

    export = sub.add_parser("export", help="write a serving artifact (vectors, ids, manifest) from a `csmf train` run")
    export.add_argument("--run", required=True, help="the run folder `csmf train --out` wrote")
    export.add_argument("--out", required=True, help="artifact folder to write")
    export.add_argument("--weights", metavar="STAGE:W,...", help="default objective weights (default: 1 each)")
    export.add_argument(
        "--onnx",
        action="store_true",
        help="also write the user and item towers as ONNX to <out>/onnx (pip install 'csmf[onnx]')",
    )
    _common(export)  # --config / --set are refused: a run is exported as it was trained

    extend = sub.add_parser(
        "extend", help="grow a finished `csmf train` run by one objective of its data; the others score as before"
    )
    extend.add_argument("--run", required=True, help="the run folder `csmf train --out` wrote (grown in place)")
    extend.add_argument(
        "--stage", required=True, help="the objective to add: a stage of the run's data it did not train"
    )
    _data_flags(extend)  # the run's own data by default; given, they must load the same pairs (else refused)
    extend.add_argument("--quiet", action="store_true", help="no progress bars")
    _log_level_flag(extend, None)

    serve = sub.add_parser("serve", help="serve an exported artifact over HTTP (FastAPI; docs at /docs)")
    serve.add_argument("--artifact", required=True, help="folder written by `csmf export`")
    # each flag overrides serve.<field> of --config / --set (defaults: docs/config.md, [serve])
    serve.add_argument("--index", choices=["exact", "hnsw", "milvus"],
                       help="faiss exact (default), faiss hnsw, or milvus (see --milvus-uri)")  # fmt: skip
    serve.add_argument("--milvus-uri", help="milvus: a .db file (embedded milvus-lite) or a server, http://host:19530")
    serve.add_argument("--hnsw-m", type=int, help="HNSW graph degree M (default 32)")
    serve.add_argument("--ef-search", type=int, help="HNSW efSearch (default 128)")
    serve.add_argument("--hnsw-file", help="HNSW graph file: reused when built from these items, else written there")
    serve.add_argument("--threads", type=int, help="threads of one batched search (default 1; 0 = all cores)")
    serve.add_argument("--workers", type=int, help="server processes sharing the port and the vectors (default 1)")
    serve.add_argument("--fallback", choices=["none", "popularity"],
                       help="unknown users: 404 (none, default) or the most popular items")  # fmt: skip
    serve.add_argument("--max-ids", type=int,
                       help=f"most user ids in one POST /recommend (default {ServeConfig.max_ids:,})")  # fmt: skip
    serve.add_argument("--max-results", type=int,
                       help=f"most items per request, user ids x k (default {ServeConfig.max_results:,})")  # fmt: skip
    serve.add_argument("--max-body-bytes", type=int,
                       help=f"largest request body, else 413 (default {ServeConfig.max_body_bytes:,})")  # fmt: skip
    serve.add_argument("--allow-writes", action="store_true", default=None,
                       help="answer POST /items and DELETE /items/{id} (off by default), to requests carrying the "
                            "bearer token of CSMF_WRITE_TOKEN or --write-token-file")  # fmt: skip
    serve.add_argument("--write-token-file", help="file whose first line is the write token (else CSMF_WRITE_TOKEN)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--log-format", choices=FORMATS, default="text",
                       help="text (default): lines as the other commands write them; json: one object a line "
                            "(time, level, logger, message), uvicorn's lines too")  # fmt: skip
    _common(serve)

    load = sub.add_parser("loadtest", help="start csmf serve on 127.0.0.1 and drive it with concurrent clients")
    load.add_argument("--artifact", required=True, help="folder written by `csmf export`")
    load.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    load.add_argument("--requests", type=int, default=20_000, help="Python clients: requests in all (default 20000)")
    load.add_argument("--seconds", type=float, default=20.0, help="wrk: seconds of load after a warm-up (default 20)")
    load.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk when installed (a C load generator), else Python clients with a warning",
    )
    load.add_argument("--k", type=int, default=50, help="items per request (default 50)")
    load.add_argument("--heavy-clients", type=int, default=0,
                      help="isolation instead: a cheap GET's p50/p99 idle, then while this many clients loop "
                           "the largest allowed POST /recommend (--seconds each); 0: the throughput test")  # fmt: skip
    load.add_argument("--index", choices=["exact", "hnsw"], help="the server's index (default: serve.index)")
    load.add_argument("--workers", type=int, help="the server's worker processes (default: serve.workers)")
    load.add_argument("--threads", type=int, help="the server's threads per batched search (default: serve.threads)")
    load.add_argument("--hnsw-m", type=int, help="the server's HNSW M (default: serve.hnsw_m)")
    load.add_argument("--ef-search", type=int, help="the server's HNSW efSearch (default: serve.ef_search)")
    load.add_argument("--hnsw-file", help="the server's HNSW graph file (default: serve.hnsw_file)")
    load.add_argument("--out", help="result JSON (default results/serving/loadtest.json; with --heavy-clients "
                      "results/serving/isolation.json)")  # fmt: skip
    _common(load)

    query = sub.add_parser("querybench", help="fused vs single-objective vs per-objective-index query time; HNSW")
    query.add_argument("--items", type=int, default=1_000_000, help="synthetic catalogue size (default 1M)")
    query.add_argument("--users", type=int, default=256, help="queries per batch (default 256)")
    query.add_argument("--artifact", help="also measure HNSW recall@50 and speed-up on this artifact")
    query.add_argument("--out", default="results/serving/querybench.json", help="result JSON")
    _common(query)  # serve.hnsw_m and serve.ef_search set the HNSW it measures

    speed = sub.add_parser("trainspeed", help="training batch/s, idle and loaded machine, per OpenMP wait policy")
    speed.add_argument("--seconds", type=float, default=20.0, help="wall time of each measurement (default 20)")
    speed.add_argument("--out", default="results/trainspeed.json", help="result JSON")
    _common(speed)

    data = sub.add_parser("data", help="load and split a dataset; print its summary, load report and leak check")
    _data_flags(data)
    data.add_argument("--convert", action="store_true",
                      help="with --set data.cache_dir=DIR: convert the log into its Parquet cache (or check it is "
                           "current) and print the manifest, without loading it")  # fmt: skip
    _common(data)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    at = argv.index(args.command)  # after the options before it (--log-level)
    # what --nproc hands to the processes it launches: the command's arguments, then the options given before it
    args.argv = [*argv[at + 1 :], *argv[:at]]
    with cli_logging(args.log_level, getattr(args, "log_format", "text")):
        try:
            return COMMANDS[args.command](args)
        except (DataError, ConfigError, ArtifactError, CheckpointError) as err:
            logger.error(f"csmf: error: {err}")
            return 2


if __name__ == "__main__":
    sys.exit(main())
