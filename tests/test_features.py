"""The feature schema: categorical columns with too many values are hashed into buckets (never a dense
number), overrides pick the kind, a list column is a bag whose embedding is the mean of its codes' rows,
and a list-valued column in a log loads as a bag instead of failing inside pyarrow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from csmf.backbones.features import Features, stable_hash
from csmf.config import Config, override
from csmf.data.errors import DataError
from csmf.data.logtable import load_log
from csmf.data.split import split_log

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_categorical_above_the_threshold_is_hashed_not_made_dense():
    ids = np.arange(1000, 1100) * 7919  # 100 distinct integer values, e.g. a shop id
    f = Features.from_arrays({"shop": ids, "age": np.array([1, 2] * 50)}, max_categories=50, hash_buckets=16)
    assert f.dense is None and f.hashed == ("shop",)
    assert f.cardinality == {"age": 2, "shop": 16}
    assert torch.equal(f.categorical["shop"], torch.from_numpy(stable_hash(ids) % 16))
    same = Features.from_arrays({"shop": ids[::-1].copy()}, max_categories=50, hash_buckets=16)
    assert torch.equal(same.categorical["shop"], f.categorical["shop"].flip(0))  # a value keeps its bucket
    assert len(torch.unique(f.categorical["shop"])) > 8  # spread over the buckets


def test_overrides_pick_the_kind():
    values = np.array([1, 5, 9, 5], dtype=np.int64)
    dense = Features.from_arrays({"count": values}, max_categories=10, dense_names=("count",))
    assert dense.cardinality == {} and dense.n_dense == 1
    cat = Features.from_arrays({"score": np.array([0.5, 1.5, 0.5])}, 10, categorical_names=("score",))
    assert cat.cardinality == {"score": 2} and cat.n_dense == 0


def test_a_bag_embeds_as_the_mean_of_its_codes_rows():
    bags = np.array([[1, 2, 0], [3, 0, 0], [0, 0, 0]])
    f = Features.from_arrays({"tags": bags}, max_categories=10)
    assert f.cardinality == {"tags": 4}
    weight = torch.arange(8, dtype=torch.float32).reshape(4, 2)  # row r = (2r, 2r + 1)
    got = f.lookup("tags", torch.tensor([0, 1, 2]), weight)
    assert torch.equal(got, torch.tensor([[3.0, 4.0], [6.0, 7.0], [0.0, 0.0]]))  # mean of rows 1, 2; row 3; empty
    assert torch.equal(f.lookup_all("tags", weight), got)


def test_a_list_column_loads_as_a_bag_and_trains(tmp_path):
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 600), rng.integers(0, 40, 600)
    tags = [[f"t{(u + k) % 9}" for k in range(int(u) % 3)] for u in users]
    click, buy = (rng.random(600) < 0.6).astype(int), (rng.random(600) < 0.2).astype(int)
    tag_lists = pa.array(tags, pa.list_(pa.string()))
    table = pa.table({"user_id": users, "item_id": items, "click": click, "buy": buy, "tags": tag_lists})
    pq.write_table(table, tmp_path / "log.parquet")
    log = load_log(Path(tmp_path / "log.parquet"))
    assert log.stages == ("click", "buy")
    bag = log.user_features["tags"]
    assert bag.ndim == 2 and bag.shape[0] == log.n_users
    counts = {int(u): len(set(t)) for u, t in zip(users, tags, strict=True)}  # distinct tags of each user
    for index, original in enumerate(log.user_ids):
        assert (bag[index] > 0).sum() == counts[int(original)]
    from csmf.models.csmf import CSMF

    data = split_log(log, 0.2, 0.1, 0)
    cfg = override(Config(), ["model.dim=8", "train.max_epochs=1", "train.distill="])
    model = CSMF(cfg).fit(data)
    assert torch.isfinite(model.score(np.arange(5), "buy")).all()


def test_a_list_valued_stage_column_is_named(tmp_path):
    table = pa.table({"user_id": [1, 2], "item_id": [3, 4], "click": pa.array([[1], [0]], pa.list_(pa.int64()))})
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="stage column 'click' holds lists"):
        load_log(Path(tmp_path / "bad.parquet"), stages=("click",))


def test_the_cold_item_view_keeps_only_test_pairs_of_rarely_trained_items(sim_data):
    from csmf.data.split import cold_item_view

    degree = sum(np.bincount(sim_data.matrix(b).indices, minlength=sim_data.n_items) for b in sim_data.behaviours)
    k = int(np.percentile(degree, 10))  # the rarest tenth of the catalogue
    view, n_cold = cold_item_view(sim_data, k)
    assert n_cold == int((degree <= k).sum()) > 0
    for s in sim_data.stages:
        items = np.unique(view.test[s].indices)
        assert (degree[items] <= k).all()
        kept = sim_data.test[s][:, degree <= k]
        assert view.test[s].nnz == kept.nnz  # every such pair stays, nothing else
    assert view.train is sim_data.train
    assert np.array_equal(view.candidates, degree <= k)  # ranked among the cold items only


def test_the_id_only_variant_reads_no_feature(sim_data):
    from csmf.backbones import build_backbone
    from csmf.models.csmf import CSMF

    assert sim_data.item_features  # the simulator's item_category
    cfg = override(Config(), ["model.dim=8"])
    variant = CSMF.variant("csmf-id-only", cfg)
    assert variant.cfg.model.features is False and variant.cfg.cascade == cfg.cascade
    with_features, without = build_backbone(sim_data, cfg, 0), build_backbone(sim_data, variant.cfg, 0)
    assert len(with_features.item_tables) > 0 and len(without.item_tables) == 0


def test_history_bags_of_a_row_sparse_table_pool_the_same_and_move_only_the_rows_they_read():
    import scipy.sparse as sp

    from csmf.backbones.features import pool_bags

    n_users, n_items, dim = 30, 50, 6
    mats = [sp.random(n_users, n_items, density=d, format="csr", random_state=k, dtype=np.float32)
            for k, d in enumerate((0.2, 0.05))]  # fmt: skip
    for m in mats:
        m.data[:] = 1.0
    mats[1] = sp.csr_matrix(mats[1].multiply(np.arange(n_users)[:, None] != 3))  # user 3: an empty bag
    users = np.array([0, 3, 7, 7, 12, 29])
    leave_out = np.array([mats[0][u].indices[0] if mats[0][u].nnz else 1 for u in users])
    got = {}
    for sparse_grad in (False, True):
        start = np.random.default_rng(9).standard_normal((n_items, dim)).astype(np.float32)  # the same table twice
        table = torch.nn.Parameter(torch.from_numpy(start))
        bags = pool_bags(table, mats, users, leave_out, 0.5, sparse_grad)
        sum(b.square().sum() for b in bags).backward()
        assert table.grad.is_sparse == sparse_grad
        got[sparse_grad] = ([b.detach() for b in bags], table.grad.to_dense())
    for dense, sparse in zip(got[False][0], got[True][0], strict=True):
        torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(got[True][1], got[False][1])
    read = np.unique(np.concatenate([m[users].indices for m in mats] + [leave_out]))
    assert set(got[True][1].abs().sum(dim=1).nonzero().ravel().tolist()) <= set(read.tolist())
    with torch.no_grad():  # scoring takes the product either way: a trained model and the same model loaded agree
        scored = [pool_bags(table, mats, users, leave_out, 0.5, s) for s in (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(*scored, strict=True))
