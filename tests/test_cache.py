"""The Parquet cache: it holds exactly what the in-memory loader reads, a changed source or option rebuilds
it (and a partial one is never read), its per-pair split obeys the leak rule whatever the block size, batches
cover every training row once per epoch, and CSMF trained from it keeps the cascade's guarantees."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from csmf.cli import main
from csmf.config import Config, ConfigError, SimConfig, override
from csmf.data.aliccp import aliccp_raw_source, load_aliccp
from csmf.data.cache import Cache, build_cache, ensure_cache
from csmf.data.datasets import load_dataset
from csmf.data.errors import DataError
from csmf.data.schema import leak_violations
from csmf.data.simulate import simulate, simulate_layout
from csmf.data.sources import log_source, pair_split

pytestmark = pytest.mark.usefixtures("one_thread")

SIM = SimConfig(n_users=200, n_items=120, chunk_users=50, item_features=1)


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("raw")
    simulate_layout(SIM, "aliccp-raw", folder, progress=False)
    return folder


def id_pairs(data, mat) -> set:
    coo = mat.tocoo()
    return set(zip(data.user_ids[coo.row].tolist(), data.item_ids[coo.col].tolist(), strict=True))


def test_the_cache_holds_what_the_in_memory_loader_reads(raw_folder, tmp_path):
    cache = ensure_cache(aliccp_raw_source(raw_folder), tmp_path / "c", log=lambda _m: None)
    cached, memory = cache.cascade("aliccp"), load_aliccp(raw_folder)
    for stage in memory.stages:
        for part in ("train", "valid", "test"):
            assert id_pairs(cached, getattr(cached, part)[stage]) == id_pairs(memory, getattr(memory, part)[stage])
    assert leak_violations(cached) == []
    assert set(cached.user_features) == set(memory.user_features)
    assert set(cached.item_features) == set(memory.item_features)
    # features are per entity, in the cache's own id order: compare through the original ids
    for name in cached.item_features:
        ours = dict(zip(cached.item_ids.tolist(), cached.item_features[name].tolist(), strict=True))
        theirs = dict(zip(memory.item_ids.tolist(), memory.item_features[name].tolist(), strict=True))
        groups = {}
        for item, code in ours.items():  # the same partition of items into values (codes may differ)
            groups.setdefault(code, set()).add(theirs[item])
        assert all(len(v) == 1 for v in groups.values()), name
    bags = [name for name, v in memory.user_features.items() if np.ndim(v) == 2]
    assert bags == ["109_14"]  # the behaviour list field of the common features: a bag per user
    for name in bags:  # each user's bag holds the same number of distinct values in both
        ours = dict(zip(cached.user_ids.tolist(), (cached.user_features[name] > 0).sum(1).tolist(), strict=True))
        theirs = dict(zip(memory.user_ids.tolist(), (memory.user_features[name] > 0).sum(1).tolist(), strict=True))
        assert ours == theirs and max(ours.values()) == 2
    manifest = cache.manifest
    assert manifest["rows"] == cached.report.rows_read and manifest["rows_per_second"] > 0
    assert manifest["features"]["301"]["side"] == "row"  # the scenario varies per impression
    # ... and is the request context: every pair carries its last row's scenario, the same in both
    assert manifest["context"] == ["301"] and sorted(cached.context) == sorted(memory.context) == ["301"]
    for data in (cached, memory):
        coo = data.context["301"].tocoo()
        data.pair_scenario = dict(zip(zip(data.user_ids[coo.row].tolist(), data.item_ids[coo.col].tolist(),
                                          strict=True), coo.data.tolist(), strict=True))  # fmt: skip
    assert cached.pair_scenario.keys() == memory.pair_scenario.keys()
    groups = {}
    for pair, code in cached.pair_scenario.items():
        groups.setdefault(code, set()).add(memory.pair_scenario[pair])
    assert len(groups) == 3 and all(len(v) == 1 for v in groups.values())


def test_a_changed_source_file_or_option_rebuilds_the_cache(raw_folder, tmp_path):
    folder, messages = tmp_path / "c", []
    copy = tmp_path / "raw"
    copy.mkdir()
    for f in raw_folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    ensure_cache(aliccp_raw_source(copy), folder, log=messages.append)
    built = (folder / "manifest.json").stat().st_mtime_ns
    ensure_cache(aliccp_raw_source(copy), folder, log=messages.append)
    assert (folder / "manifest.json").stat().st_mtime_ns == built and messages == []  # reused
    skeleton = copy / "sample_skeleton_test.csv"
    lines = skeleton.read_text().split("\n")
    skeleton.write_text("\n".join(lines[:-3] + [""]))  # two impressions fewer, same size class
    stat = skeleton.stat()
    os.utime(skeleton, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cache = ensure_cache(aliccp_raw_source(copy), folder, log=messages.append)
    assert "changed" in messages[-1] and cache.manifest["rows_per_split"]["test"] == sum(
        1 for line in lines[:-3] if line
    )
    ensure_cache(aliccp_raw_source(copy, valid_frac=0.2), folder, log=messages.append)
    assert "changed" in messages[-1] and len(messages) == 2


def test_an_unfinished_cache_is_never_read(raw_folder, tmp_path):
    folder = tmp_path / "c"
    build_cache(aliccp_raw_source(raw_folder), folder)
    (folder / "manifest.json").unlink()  # as if the conversion had been killed before its last step
    with pytest.raises(Exception, match="not a finished csmf cache"):
        Cache(folder)
    messages = []
    ensure_cache(aliccp_raw_source(raw_folder), folder, log=messages.append)
    assert "unfinished" in messages[0] and (folder / "manifest.json").exists()


@pytest.mark.parametrize("damage", ["delete", "truncate", "stray", "old-manifest-delete"])
def test_a_damaged_bucket_is_named_and_converted_again_never_a_short_load(raw_folder, tmp_path, damage):
    folder = tmp_path / "c"
    manifest = build_cache(aliccp_raw_source(raw_folder), folder)
    assert sum(manifest["bucket_rows"].values()) == manifest["rows"]
    bucket = folder / "rows" / "bucket=03" / "part-0.parquet"
    if damage == "truncate":
        bucket.write_bytes(bucket.read_bytes()[: bucket.stat().st_size // 2])
        problem = "not a readable Parquet file"
    elif damage == "stray":  # a file the conversion did not write would add its rows to the log
        bucket = bucket.with_name("part-1.parquet")
        pq.write_table(pq.read_table(folder / "rows" / "bucket=03" / "part-0.parquet"), bucket)
        problem = "not written by the conversion"
    else:
        bucket.unlink()
        problem = "missing"
        if damage == "old-manifest-delete":  # a cache built before the manifest listed its buckets
            del manifest["bucket_rows"]
            (folder / "manifest.json").write_text(json.dumps(manifest))
            bucket, problem = folder / "rows", f"rows, the manifest records {manifest['rows']:,}"
    with pytest.raises(DataError, match=re.escape(f"{bucket}: ") + ".*" + re.escape(problem) + ".*delete that "
                       "folder and run again"):  # fmt: skip
        Cache(folder)
    messages = []
    cache = ensure_cache(aliccp_raw_source(raw_folder), folder, log=messages.append)
    assert len(messages) == 1 and messages[0].startswith(f"cache {folder}: {bucket} ")  # the file, then rebuilt
    assert problem in messages[0] and messages[0].endswith("converting again")
    assert sum(len(m.data) for m in cache.matrices()["train"].values()) > 0
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in cache.bucket_files()) == cache.manifest["rows"]


def test_a_bucket_damaged_inside_is_named_when_read(raw_folder, tmp_path):
    folder = tmp_path / "c"
    build_cache(aliccp_raw_source(raw_folder), folder)
    bucket = folder / "rows" / "bucket=03" / "part-0.parquet"
    data = bytearray(bucket.read_bytes())
    data[8:400] = bytes(392)  # the first column pages zeroed; the footer (and its row count) intact
    bucket.write_bytes(bytes(data))
    cache = Cache(folder)
    with pytest.raises(DataError, match=re.escape(f"{bucket}: cannot be read")):
        cache.matrices()


def test_the_pair_split_keeps_every_row_of_a_pair_together_whatever_the_blocks():
    rng = np.random.default_rng(0)
    users = pa.array(rng.integers(0, 50, 5000).astype(str))
    items = pa.array(rng.integers(0, 40, 5000))
    whole = pair_split(users, items, 0.2, 0.1, seed=3)
    pieces = np.concatenate(
        [pair_split(users[i : i + 777], items[i : i + 777], 0.2, 0.1, 3) for i in range(0, 5000, 777)]
    )
    assert np.array_equal(whole, pieces)
    key = np.char.add(np.asarray(users).astype(str), np.char.add("/", np.asarray(items).astype(str)))
    for k in np.unique(key):
        assert len(np.unique(whole[key == k])) == 1
    share = np.bincount(whole, minlength=3) / len(whole)
    assert abs(share[2] - 0.2) < 0.05 and abs(share[1] - 0.08) < 0.04
    assert not np.array_equal(whole, pair_split(users, items, 0.2, 0.1, seed=4))


def test_batches_cover_every_training_row_once_per_epoch(tmp_path):
    path = tmp_path / "sim.parquet"
    simulate(SIM, path, progress=False)
    source = log_source(path, ("exposure", "click", "conversion"), "user_id", "item_id", 0.2, 0.1, 0, "sim")
    cache = ensure_cache(source, tmp_path / "c", buckets=4, log=lambda _m: None)
    rows = pq.read_table(path)
    for stage in ("exposure", "click"):
        got = [
            pair for us, its, _ in cache.batches(stage, 64, 1, buffer_rows=300) for pair in zip(us, its, strict=True)
        ]
        again = [
            pair for us, its, _ in cache.batches(stage, 64, 2, buffer_rows=300) for pair in zip(us, its, strict=True)
        ]
        expected = cache.manifest["stage_rows"][stage] - sum(
            m.nnz for m in (cache.matrix(stage, "val"), cache.matrix(stage, "test"))
        )
        assert len(got) == expected == int(cache.train_item_counts(stage).sum())
        assert sorted(got) == sorted(again) and got != again  # the same rows, another order
    assert cache.manifest["rows"] == rows.num_rows


def test_streamed_training_keeps_earlier_stages_frozen_and_refuses_what_it_cannot_stream(tmp_path):
    from test_cascade import changed_and_frozen, snapshot

    from csmf.cascade import CascadeTrainer

    cfg = override(Config(), [
        "data.dataset=sim", f"data.cache_dir={tmp_path / 'c'}", "sim.n_users=200", "sim.n_items=120",
        "model.encoder=mlp", "model.history=false", "model.user_id=true", "model.dim=16", "model.id_dim=16",
        "train.stream=true", "train.distill=", "train.aux_weight=0", "train.full_softmax_max_items=0",
        "train.max_epochs=1", "train.batch_size=128", "train.extra_negatives=64", "sim.scenarios=3",
    ])  # fmt: skip
    data = load_dataset(cfg)
    assert data.stream is not None and sorted(data.context) == ["scenario"]
    codes = np.concatenate([c["scenario"] for _, _, c in data.stream.batches("click", 64, 0)])
    assert set(codes.tolist()) == {1, 2, 3}  # every streamed row brings its own scenario
    trainer = CascadeTrainer(data, cfg)
    assert trainer.model.reads_context and trainer.model.user.ctx_emb["scenario"].weight.shape[0] == 4
    for index in range(3):  # train-1, prune-1, recover-1
        trainer.run_phase(index)
    before = snapshot(trainer.model)
    trainer.run_phase(3)
    assert changed_and_frozen(before, snapshot(trainer.model), {1}, stage=2) > 0  # stage 2 learned, 1 did not
    with pytest.raises(ConfigError, match="model.encoder = 'graph' builds its graph from every user's"):
        CascadeTrainer(data, override(cfg, ["model.encoder=graph"]))


def test_csmf_train_runs_from_the_cache_with_the_stream_preset(tmp_path):
    argv = ["train", "--dataset", "sim", "--config", "stream", "--out", str(tmp_path / "run"), "--quiet",
            "--set", f"data.cache_dir={tmp_path / 'c'}", "--set", "sim.n_users=150", "--set", "sim.n_items=100",
            "--set", "model.dim=8", "--set", "model.id_dim=8", "--set", "train.extra_negatives=32"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"exposure", "click", "conversion"}
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["name"] == "sim"


def test_csmf_data_convert_builds_then_reuses_the_cache(raw_folder, tmp_path, capsys):
    argv = ["data", "--dataset", "aliccp", "--data-dir", str(raw_folder), "--convert", "--quiet",
            "--set", f"data.cache_dir={tmp_path / 'c'}"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "rows/s" in first and "feature 109_14: user" in first and "(bag)" in first
    built = (tmp_path / "c" / "manifest.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (tmp_path / "c" / "manifest.json").stat().st_mtime_ns == built  # current: not converted again
    with pytest.raises(ConfigError, match="loads in memory"):
        load_dataset(override(Config(), ["data.dataset=jd", f"data.cache_dir={tmp_path / 'k'}"]))


def test_large_id_tables_step_row_sparse_in_memory_and_keep_earlier_stages_frozen():
    """In memory, an ID table of train.sparse_table_rows rows or more takes sparse gradients and SparseAdam (a dense
    step over a million-row table is ~50x the cost); smaller tables stay dense, so small logs train as before."""
    from test_cascade import changed_and_frozen, snapshot

    from csmf.cascade import CascadeTrainer

    cfg = override(Config(), [
        "data.dataset=sim", "sim.n_users=200", "sim.n_items=120", "model.encoder=mlp", "model.history=false",
        "model.user_id=true", "model.dim=16", "model.id_dim=16", "train.distill=", "train.aux_weight=0",
        "train.full_softmax_max_items=0", "train.max_epochs=1", "train.batch_size=128", "train.extra_negatives=64",
        "train.sparse_table_rows=150",
    ])  # fmt: skip
    data = load_dataset(cfg)
    assert data.stream is None and data.n_users >= 150 > data.n_items
    trainer = CascadeTrainer(data, cfg)
    model = trainer.model
    assert trainer.sparse == [model.user.id_emb] and model.user.id_emb.sparse and not model.item.id_emb.sparse
    for index in range(3):  # train-1, prune-1, recover-1
        trainer.run_phase(index)
    assert model.user.id_emb.weight.grad is None or model.user.id_emb.weight.grad.is_sparse
    before = snapshot(model)
    trainer.run_phase(3)
    assert changed_and_frozen(before, snapshot(model), {1}, stage=2) > 0  # stage 2 learned, stage 1 did not
    dense = CascadeTrainer(data, override(cfg, ["train.sparse_table_rows=0"]))
    assert dense.sparse == [] and not dense.model.user.id_emb.sparse


def test_in_memory_rows_can_keep_the_test_users_a_streamed_row_evaluates(tmp_path):
    """data.test_users keeps the test pairs of the same seeded sample of held-out users that streamed training
    evaluates (data.stream_eval_users), so the two rows of the scale suite are tested on the same users."""
    base = override(Config(), [
        "data.dataset=sim", f"data.cache_dir={tmp_path / 'c'}", "sim.n_users=300", "sim.n_items=120",
        "model.encoder=mlp", "model.history=false", "model.user_id=true", "train.distill=", "train.aux_weight=0",
        "train.full_softmax_max_items=0",
    ])  # fmt: skip
    everyone = load_dataset(base)
    memory = load_dataset(override(base, ["data.test_users=40"]))
    streamed = load_dataset(override(base, ["train.stream=true", "data.stream_eval_users=40"]))
    for stage in everyone.stages:
        assert (memory.test[stage] != streamed.test[stage]).nnz == 0, stage
        assert 0 < memory.test[stage].nnz < everyone.test[stage].nnz, stage
        assert memory.test[stage].dtype == everyone.test[stage].dtype
        assert (memory.train[stage] != everyone.train[stage]).nnz == 0  # training keeps every user
    assert len(np.unique(memory.test[everyone.stages[0]].tocoo().row)) <= 40


def test_pair_context_is_each_pairs_last_row_read_built_straight_into_csr():
    """The lean build (sorted keys into CSR) against the plain one (every row's pair and code through COO, the
    last row read per pair kept): the same matrices, for repeated pairs, rows spread over batches, empty users."""
    from types import SimpleNamespace

    from csmf.data.cache import Cache

    rng = np.random.default_rng(0)
    n_users, n_items, n = 50, 40, 3000
    u = rng.integers(0, n_users - 5, n).astype(np.int32)  # the last users have no row
    i = rng.integers(0, n_items, n).astype(np.int32)
    codes = rng.integers(1, 9, (n, 2)).astype(np.int32)
    cuts = [0, 7, 1000, 1001, 2500, n]
    rows = [(u[a:b], i[a:b], codes[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    fake = SimpleNamespace(context=("a", "b"), n_users=n_users, n_items=n_items)
    built = Cache._pair_context(fake, rows)
    assert rows == []  # consumed
    last = {}
    for r in range(n):  # the plain rule: a later row of a pair overwrites an earlier one
        last[(int(u[r]), int(i[r]))] = r
    pairs = np.array(sorted(last))
    for k, name in enumerate(("a", "b")):
        values = np.array([codes[last[tuple(p)], k] for p in pairs], dtype=np.int64)
        expected = sp.csr_matrix((values, (pairs[:, 0], pairs[:, 1])), shape=(n_users, n_items), dtype=np.int64)
        got = built[name]
        assert got.dtype == np.int32 and got.has_sorted_indices and got.nnz == len(pairs)  # the cache's codes
        assert (got != expected).nnz == 0
    assert Cache._pair_context(SimpleNamespace(context=(), n_users=1, n_items=1), []) == {}


@pytest.mark.parametrize("skip", [0.99, 1e-9])
def test_ar_is_skipped_only_where_pruning_cost_at_most_cascade_recover_skip(skip):
    """cascade.recover_skip: AR after a stage's pruning runs unless pruning lost at most that share of the stage's
    best validation metric; a skipped phase changes no weight and says why."""
    from test_cascade import snapshot

    from csmf.cascade import CascadeTrainer

    cfg = override(Config(), [
        "data.dataset=sim", "sim.n_users=200", "sim.n_items=120", "model.encoder=mlp", "model.history=false",
        "model.user_id=true", "model.dim=16", "model.id_dim=16", "train.distill=", "train.aux_weight=0",
        "train.full_softmax_max_items=0", "train.max_epochs=1", "train.batch_size=128", "train.extra_negatives=64",
        f"cascade.recover_skip={skip}", "cascade.recover_frac=0.5",
    ])  # fmt: skip
    trainer = CascadeTrainer(load_dataset(cfg), cfg)
    assert [p.name for p in trainer.phases[:3]] == ["train-1", "prune-1", "recover-1"]
    trainer.run_phase(0)
    trainer.run_phase(1)
    best = trainer.history[0]["epochs"][0]["valid"]["recall@50"]
    after = trainer.history[1]["valid"]["recall@50"]
    before = snapshot(trainer.model)
    record = trainer.run_phase(2)
    unchanged = all(torch.equal(before[k], v) for k, v in snapshot(trainer.model).items())
    if best - after <= skip * best:  # skip 0.99: pruning cannot cost that much here
        assert skip == 0.99 and "skipped" in record and "at most cascade.recover_skip" in record["skipped"]
        assert unchanged
    else:  # skip ~0: any loss runs AR, and AR moves the kept units
        assert skip < 0.5 and "skipped" not in record and record["epochs"] and not unchanged
