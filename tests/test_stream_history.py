"""Streamed training with history bags and auxiliary rows (csmf.data.stream_history, Cache.weighted_batches): each
user's histories are built once from the cache, hold exactly the latest H items per behaviour (RecentHistory's rule)
and never a held-out pair; validation and the test read the same matrices; train.aux_weight streams the other
stages' rows that are not the stage's own positives, at that weight."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import torch

from csmf.config import Config, load_config, override
from csmf.data.batches import StreamedBatches, stage_pairs
from csmf.data.datasets import load_dataset
from csmf.data.histories import RecentHistory
from csmf.data.schema import difference, union
from csmf.data.stream_history import recent_histories
from csmf.distributed import Ranks
from csmf.rules import SCALE_HISTORY, fit_to_size

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = ("exposure", "click", "conversion")
AUX = float(np.float32(0.3))  # train.aux_weight as a float32 batch weight


def pairs(mat: sp.spmatrix) -> set[tuple[int, int]]:
    coo = mat.tocoo()
    return set(zip(coo.row.tolist(), coo.col.tolist(), strict=True))


def fake_cache(seed: int, n_users: int = 60, n_items: int = 40, buckets: int = 4, rows: int = 3000):
    """A cache-shaped reader over random rows (duplicates, held-out rows, users spread over buckets by u % B), each
    bucket read in blocks of 97 rows; and the training matrix of every behaviour, built the plain way."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, rows).astype(np.int32)
    items = rng.integers(0, n_items, rows).astype(np.int32)
    split = rng.choice(np.array([0, 0, 0, 1, 2], np.int8), rows)
    marks = {"exposure": np.ones(rows, np.int8), "click": (rng.random(rows) < 0.5).astype(np.int8)}
    table = pa.table({"user": users, "item": items, "split": split, **marks})

    def blocks(bucket: int, columns: list[str]):
        part = table.filter(pa.array(users % buckets == bucket)).select(columns)
        yield from part.to_batches(max_chunksize=97)

    cache = SimpleNamespace(bucket_files=lambda: list(range(buckets)), blocks=blocks, n_users=n_users,
                            n_items=n_items, folder="fake")  # fmt: skip
    train = {b: sp.csr_matrix((np.ones(int(((split == 0) & (m == 1)).sum()), np.float32),
                               (users[(split == 0) & (m == 1)], items[(split == 0) & (m == 1)])),
                              shape=(n_users, n_items)) for b, m in marks.items()}  # fmt: skip
    for m in train.values():
        m.data[:] = 1.0
    return cache, train


@pytest.mark.parametrize("limit", [0, 1, 3])
@pytest.mark.parametrize("pending_rows", [1, 10_000])
def test_histories_read_block_by_block_keep_exactly_each_users_latest_items(limit, pending_rows):
    """The same items RecentHistory keeps of the in-memory training rows, whether the kept items are cut after
    every block (pending_rows 1: merged across blocks) or once a bucket; held-out rows never enter."""
    cache, train = fake_cache(seed=limit)
    got = recent_histories(cache, ("exposure", "click"), limit, seed=7, pending_rows=pending_rows)
    users = np.arange(cache.n_users)
    for b, mat in got.items():
        expected = RecentHistory(limit, None, 7).rows(train[b], users)
        assert mat.shape == expected.shape and mat.dtype == np.float32 and mat.indices.dtype == np.int32
        assert mat.has_sorted_indices and pairs(mat) == pairs(expected), (b, limit)
        assert np.all(mat.data == 1.0)
        if limit:
            assert 0 < np.diff(mat.indptr).max() <= limit
            assert (np.diff(train[b].indptr) > limit).any()  # the cut bites: some user had more


def streamed_cfg(tmp_path, *extra: str) -> Config:
    return override(Config(), [
        "data.dataset=sim", f"data.cache_dir={tmp_path / 'c'}", "sim.n_users=200", "sim.n_items=120",
        "sim.exposures_per_user=30", "data.stream_eval_users=60", "model.encoder=mlp", "model.history=true",
        "model.history_max=4", "model.user_id=true", "model.dim=16", "model.id_dim=16", "model.history_dim=8",
        "train.stream=true", "train.distill=", "train.full_softmax_max_items=0", "train.max_epochs=1",
        "train.batch_size=128", "train.extra_negatives=32", *extra,
    ])  # fmt: skip


def test_a_streamed_mlp_run_with_history_bags_and_aux_rows_trains_on_bounded_histories(tmp_path, monkeypatch):
    """Refused before: model.history = true and train.aux_weight > 0 with train.stream. The histories hold every
    user's (not only the evaluated ones'), at most H = model.history_max items a behaviour and exactly the latest,
    no validation or test pair; validation and the test read them; aux rows reach the loss at their weight."""
    from test_cascade import changed_and_frozen, snapshot

    import csmf.cascade
    from csmf.cascade import CascadeTrainer

    cfg = streamed_cfg(tmp_path, "train.aux_weight=0.3")
    data = load_dataset(cfg)
    assert data.stream is not None and data.recency is None
    seen_weights: dict[int, set[float]] = {}

    class Recording(csmf.cascade.PairLoss):
        def __call__(self, batch):
            seen_weights.setdefault(self.stage, set()).update(batch.weight.unique().tolist())
            return super().__call__(batch)

    monkeypatch.setattr(csmf.cascade, "PairLoss", Recording)
    trainer = CascadeTrainer(data, cfg, run_dir=tmp_path / "run")  # a run folder: run() then only resumes
    histories, everything = trainer.tuning_history, data.stream.matrices()
    evaluated = np.unique(np.concatenate([data.valid[s].tocoo().row for s in STAGES]))
    assert np.diff(everything["train"]["exposure"].indptr).max() > 4  # the cut bites
    for b in STAGES:
        full, mat = everything["train"][b], histories[b]
        assert np.diff(mat.indptr).max() <= 4
        assert (np.diff(mat.indptr) > 0).sum() == (np.diff(full.indptr) > 0).sum() > len(evaluated)
        # exactly the latest 4 of every user's training pairs, as the backbone's own rule keeps them in memory
        assert pairs(mat) == pairs(trainer.model.recent.rows(full, np.arange(data.n_users)))
        kept = trainer.model.recent.rows(data.train[b], evaluated)  # the evaluated users' rows, held in memory
        assert pairs(kept) == pairs(mat[evaluated])
        for s in STAGES:  # no held-out pair of any stage, though every user has some
            for held in ("val", "test"):
                assert everything[held][s].nnz > 0 and not pairs(mat) & pairs(everything[held][s]), (b, s, held)
    for index in range(3):  # train-1, prune-1, recover-1
        trainer.run_phase(index)
    before = snapshot(trainer.model)
    trainer.run_phase(3)
    assert changed_and_frozen(before, snapshot(trainer.model), {1}, stage=2) > 0  # stage 2 learned, 1 did not
    for index in range(4, len(trainer.phases)):
        trainer.run_phase(index)
    # exposure: every other stage's pair is an exposure, so nothing is auxiliary; click and conversion take aux rows
    assert seen_weights[1] == {1.0}
    assert seen_weights[2] == seen_weights[3] == {1.0, AUX}
    assert trainer.run().history is histories  # the test scores from the same bounded histories


def test_aux_rows_are_the_other_stages_training_rows_that_are_not_the_stages_positives(tmp_path):
    """Per pair, stage_pairs' rule on the same rows; per row, every training row of such a pair once an epoch,
    weighted aux_weight, beside the stage's own rows (weight 1), which are those it streams without aux."""
    data = load_dataset(streamed_cfg(tmp_path))
    cache, ranks = data.stream, Ranks()
    everything = cache.matrices()
    memory = SimpleNamespace(train=everything["train"], behaviours=STAGES, matrix=lambda b: everything["train"][b])
    users, items, weights = stage_pairs(memory, "click", 0.3)
    aux = weights < 1
    expected_aux = set(zip(users[aux].tolist(), items[aux].tolist(), strict=True))
    assert expected_aux == pairs(difference(union(everything["train"]["exposure"], everything["train"]["conversion"]),
                                            everything["train"]["click"]))  # fmt: skip

    def epoch(aux_weight: float) -> tuple[list, StreamedBatches]:
        batches = StreamedBatches(cache, "click", 64, 200, 1.0, (1, 2), torch.Generator().manual_seed(0), ranks,
                                  False, 0.0, ("exposure", "conversion"), aux_weight)  # fmt: skip
        rows = []
        for b in batches.epoch():
            w = torch.ones(len(b.users)) if b.weight is None else b.weight
            assert w.dtype == torch.float32
            rows += zip(b.users.tolist(), b.items.tolist(), w.tolist(), strict=True)
        return rows, batches

    plain, plain_batches = epoch(0.0)
    weighted, batches = epoch(0.3)
    assert {w for *_, w in plain} == {1.0} and plain_batches.rows == len(plain)
    own = sorted((u, i) for u, i, w in weighted if w == 1.0)
    assert own == sorted((u, i) for u, i, _ in plain)  # the stage's own rows, unchanged
    streamed_aux = [(u, i) for u, i, w in weighted if w != 1.0]
    assert {w for *_, w in weighted} == {1.0, AUX}
    assert set(streamed_aux) == expected_aux and len(streamed_aux) >= len(expected_aux)
    assert batches.rows == len(weighted)  # logQ counts and the epoch's rows take the aux rows in
    aux_counts = np.bincount([i for _, i in streamed_aux], minlength=data.n_items)
    assert np.array_equal(batches.counts, cache.train_item_counts("click") + aux_counts)


def test_a_streamed_run_with_history_bags_bounds_them_by_default():
    """fit_to_size: streamed with bags, model.history_max 0 becomes SCALE_HISTORY (said in a note), unless set."""
    cfg = override(load_config("stream"), ["model.history=true"])
    fitted, notes = fit_to_size(cfg, 1_000, pinned=())
    assert fitted.model.history_max == SCALE_HISTORY and any("1,604 bytes a user and behaviour" in n for n in notes)
    assert fit_to_size(cfg, 1_000, pinned={"model.history_max"})[0].model.history_max == 0
    assert fit_to_size(load_config("stream"), 1_000, pinned=())[0].model.history_max == 0  # no bags: unchanged


def test_csmf_train_streams_history_bags_and_aux_rows_from_the_preset(tmp_path, capsys):
    """The command a user types: the stream preset with history bags and aux rows trains, evaluates and saves;
    the run log says which H it chose and what the histories cost."""
    from csmf.cli import main

    argv = ["train", "--dataset", "sim", "--config", "stream", "--out", str(tmp_path / "run"),
            "--set", f"data.cache_dir={tmp_path / 'c'}", "--set", "sim.n_users=150", "--set", "sim.n_items=100",
            "--set", "model.dim=8", "--set", "model.id_dim=8", "--set", "train.extra_negatives=32",
            "--set", "model.history=true", "--set", "train.aux_weight=0.2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"model.history_max = {SCALE_HISTORY}: rows are streamed" in out and "histories built from the cache" in out
    assert f"history_max = {SCALE_HISTORY}" in (tmp_path / "run" / "config.toml").read_text()
    assert sorted(p.name for p in (tmp_path / "run" / "model" / "history").iterdir()) == [
        f"{s}.npz" for s in sorted(STAGES)
    ]


def test_a_streamed_run_with_history_bags_is_extended_on_its_bounded_histories(tmp_path):
    """csmf extend compares a streamed model's histories with the bounded ones built from the cache again (the
    data in memory holds only the evaluated users' rows), and the earlier objective scores as before."""
    import json

    from csmf.cli import main

    run = tmp_path / "run"
    argv = ["train", "--dataset", "sim", "--config", "stream", "--out", str(run), "--quiet",
            "--set", f"data.cache_dir={tmp_path / 'c'}", "--set", "sim.n_users=150", "--set", "sim.n_items=100",
            "--set", "model.dim=8", "--set", "model.id_dim=8", "--set", "train.extra_negatives=32",
            "--set", "model.history=true", "--set", "model.history_max=5", "--set", "cascade.min_share=0.25",
            "--set", "cascade.objectives=exposure,click"]  # fmt: skip
    assert main(argv) == 0
    assert main(["extend", "--run", str(run), "--stage", "conversion", "--quiet"]) == 0
    report = json.loads((run / "extend-conversion.json").read_text())
    assert report["identical"] == {"exposure": {"item_vectors": True, "user_vectors": True, "scores": True}}
