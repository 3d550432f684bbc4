"""model.history_max: the user towers read each behaviour's latest H items (csmf.data.histories)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch

from csmf.backbones.features import Features
from csmf.backbones.graph import GraphBackbone
from csmf.backbones.mlp import MLPBackbone
from csmf.data.histories import RecentHistory, recency_ranks
from csmf.data.logtable import load_log
from csmf.data.split import split_log


def no_features() -> Features:
    return Features({}, {}, None)


# user 0 holds items 0..5 (item j seen at time 10 - j: item 0 is the newest), user 1 items 2, 4; user 2 none
HISTORY = sp.csr_matrix(
    (np.ones(8, dtype=np.float32), ([0, 0, 0, 0, 0, 0, 1, 1], [0, 1, 2, 3, 4, 5, 2, 4])), shape=(3, 6)
)
TIMES = np.array([10, 9, 8, 7, 6, 5, 1, 3], dtype=np.float64)
RECENCY = recency_ranks(*HISTORY.nonzero(), TIMES, 3, 6)


def test_recency_ranks_order_the_times_and_equal_times_share_a_rank():
    ranks = recency_ranks(np.array([0, 0, 1]), np.array([1, 2, 0]), np.array([5.0, 2.0, 5.0]), 2, 3)
    assert ranks.toarray().tolist() == [[0, 2, 1], [2, 0, 0]]


def test_the_latest_items_of_each_row_are_kept_with_their_values():
    weighted = HISTORY.multiply(np.arange(1, 7, dtype=np.float32)).tocsr()  # values survive the cut
    cut = RecentHistory(3, RECENCY).rows(weighted, np.array([0, 1, 2]))
    assert cut.toarray().tolist() == [[1, 2, 3, 0, 0, 0], [0, 0, 3, 0, 5, 0], [0] * 6]
    # the rows of a batch in its order (user 1 first); a limit at or above every row changes nothing
    assert RecentHistory(3, RECENCY).rows(HISTORY, np.array([1, 0]))[0].toarray().tolist() == [[0, 0, 1, 0, 1, 0]]
    whole = RecentHistory(6, RECENCY).rows(HISTORY, np.array([0, 1, 2]))
    assert (whole != HISTORY).nnz == 0
    assert (RecentHistory(0, RECENCY).rows(HISTORY, np.array([0, 1, 2])) != HISTORY).nnz == 0
    # an entry without a known time (an evaluation history's extra item) counts as the oldest
    extra = HISTORY.tolil()
    extra[1, 5] = 1
    assert RecentHistory(2, RECENCY).rows(extra.tocsr(), np.array([1])).toarray().tolist() == [[0, 0, 1, 0, 1, 0]]


def test_without_times_the_kept_items_are_a_seeded_choice():
    rows = [RecentHistory(2, None, seed).rows(HISTORY, np.array([0, 1])) for seed in (0, 0, 1, 2, 3)]
    assert (rows[0] != rows[1]).nnz == 0  # the same seed keeps the same items
    assert all(np.diff(r.indptr).tolist() == [2, 2] for r in rows)
    assert any((rows[0] != r).nnz for r in rows[2:])  # another seed, another choice


def test_the_graph_bag_reads_only_the_latest_items():
    def backbone(limit: int) -> GraphBackbone:
        model = GraphBackbone(3, 6, 4, [{"buy": 1.0}], 0, no_features(), no_features(), seed=0,
                              recent=RecentHistory(limit, RECENCY))  # fmt: skip
        model.set_history({"buy": HISTORY})
        return model

    cut, whole = backbone(2), backbone(0)
    latest = sp.csr_matrix(([1.0, 1.0, 1.0, 1.0], ([0, 0, 1, 1], [0, 1, 2, 4])), shape=(3, 6))
    users = np.array([0, 1, 2])
    # the same bag as the whole-history model given only the two latest items (item degrees from every edge)
    assert torch.allclose(cut.user_vectors(users, 1), whole.user_vectors(users, 1, history={"buy": latest}))
    assert not torch.allclose(cut.user_vectors(users, 1), whole.user_vectors(users, 1))
    assert torch.equal(cut.item_vectors(1), whole.item_vectors(1))  # item smoothing reads every edge


def test_the_mlp_bag_reads_only_the_latest_items_and_still_leaves_the_target_out():
    def backbone(limit: int) -> MLPBackbone:
        model = MLPBackbone(3, 6, 4, (), (), 4, 0, 4, ("buy",), no_features(), no_features(), 4, seed=0,
                            recent=RecentHistory(limit, RECENCY))  # fmt: skip
        model.set_history({"buy": HISTORY})
        return model

    cut, whole = backbone(2), backbone(0)
    table = cut.user.history.weight.detach()
    (bag,) = cut.bags(np.array([0, 1]))
    assert torch.allclose(bag[0], table[[0, 1]].mean(0)) and torch.allclose(bag[1], table[[2, 4]].mean(0))
    # leaving out a kept item drops it; an item the cut already dropped changes nothing
    (left,) = cut.bags(np.array([0, 0]), leave_out=np.array([1, 5]))
    assert torch.allclose(left[0], table[0]) and torch.allclose(left[1], bag[0])
    (full,) = whole.bags(np.array([0]))
    assert torch.allclose(full[0], table[:6].mean(0))


def test_a_split_log_orders_only_its_training_pairs_by_time(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    users, items = rng.integers(0, 20, n), rng.integers(0, 30, n)
    table = pa.table({"user_id": users, "item_id": items, "timestamp": rng.integers(0, 10_000, n),
                      "click": rng.random(n) < 0.5})  # fmt: skip
    pq.write_table(table, tmp_path / "log.parquet")
    data = split_log(load_log(tmp_path / "log.parquet", stages=("click",)), seed=0)
    assert data.recency is not None and data.recency.nnz > 0
    # a time for every training pair (the tuning fold's included) and for no held-out one
    assert (data.recency.astype(bool) != data.train["click"].astype(bool)).nnz == 0
    assert data.recency.multiply(data.test["click"]).nnz == 0
    assert data.tuning_view().recency is data.recency
    # a log without timestamps has none
    pq.write_table(table.drop(["timestamp"]), tmp_path / "untimed.parquet")
    assert split_log(load_log(tmp_path / "untimed.parquet", stages=("click",)), seed=0).recency is None


def test_a_saved_model_keeps_the_times_its_bags_are_cut_by(sim_data, tmp_path, one_thread):
    from csmf.config import Config, override
    from csmf.experiments.bench import model_builder
    from csmf.models import load_model

    assert sim_data.recency is not None  # the simulator writes timestamps
    users = np.arange(40)
    sets = ["model.dim=8", "train.max_epochs=1", "train.distill=", "bench.tune=false"]
    cut_cfg = override(Config(), [*sets, "model.history_max=3"])
    cut = model_builder("csmf")(cut_cfg, sim_data, False)[0].fit(sim_data)
    whole = model_builder("csmf")(override(Config(), sets), sim_data, False)[0].fit(sim_data)
    heavy = np.diff(sim_data.train["exposure"].indptr)[users] > 3
    assert heavy.any() and not torch.equal(cut.score(users, "click"), whole.score(users, "click"))
    loaded = load_model(cut.save(tmp_path / "cut"))
    assert (loaded.model.recent.recency != sim_data.recency).nnz == 0
    for stage in sim_data.stages:
        assert torch.equal(loaded.score(users, stage), cut.score(users, stage)), stage
