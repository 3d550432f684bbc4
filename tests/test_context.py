"""Per-row context (csmf.data.context): each pair keeps its latest row's value, the user tower embeds it as
owned units, evaluation ranks per (user, context) request, a saved model keeps it, the cache streams it,
and on a simulator whose scenarios carry signal the context-aware model ranks requests better."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from csmf.backbones import build_backbone
from csmf.config import Config, override
from csmf.data import context
from csmf.data.datasets import load_dataset
from csmf.data.errors import DataError
from csmf.data.logtable import load_log
from csmf.evaluation import evaluate_stage
from csmf.models.csmf import CSMF
from csmf.phases import claim

pytestmark = pytest.mark.usefixtures("one_thread")


def _log(tmp_path, rows: dict) -> str:
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table(rows), path)
    return str(path)


def test_a_pair_keeps_its_latest_rows_context_and_an_empty_cell_is_unknown(tmp_path):
    path = _log(tmp_path, {
        "user_id": [1, 1, 1, 2, 2, 2], "item_id": [10, 10, 11, 10, 12, 13], "click": [1, 1, 1, 1, 1, 1],
        "timestamp": [5, 3, 1, 1, 2, 4], "page": ["b", "a", None, "a", "c", "b"],
    })  # fmt: skip
    log = load_log(path, context_features=("page",))
    codes = {(int(log.user_ids[u]), int(log.item_ids[i])): int(c)
             for u, i, c in zip(log.users, log.items, log.context["page"], strict=True)}  # fmt: skip
    # (1, 10) was logged at t=5 ("b") and t=3 ("a"): the latest wins; an empty cell is unknown (0)
    assert codes[(1, 10)] == codes[(2, 13)] != codes[(2, 10)]
    assert codes[(1, 11)] == 0
    assert sorted({codes[(1, 10)], codes[(2, 10)], codes[(2, 12)]}) == [1, 2, 3]
    assert "page" not in log.user_features and "page" not in log.item_features


def test_context_columns_must_exist_and_hold_one_value_per_row(tmp_path):
    rows = {"user_id": [1, 2], "item_id": [3, 4], "click": [1, 1]}
    with pytest.raises(DataError, match="context column 'hour'.*not found"):
        load_log(_log(tmp_path, rows), context_features=("hour",))
    lists = pa.array([["x"], ["y"]], pa.list_(pa.string()))
    with pytest.raises(DataError, match="context column 'tags' holds lists"):
        load_log(_log(tmp_path, rows | {"tags": lists}), context_features=("tags",))


def test_requests_group_test_pairs_by_user_and_context():
    test = sp.csr_matrix(np.array([[1, 1, 1, 0], [0, 0, 1, 1]], dtype=np.float32))
    ctx = {"page": sp.csr_matrix(np.array([[1, 2, 1, 0], [0, 0, 3, 3]], dtype=np.int64))}
    asked = context.requests(test, ctx)
    assert asked.users.tolist() == [0, 0, 1]
    assert asked.codes["page"].tolist() == [1, 2, 3]
    assert asked.truth.toarray().tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]]


class _ByContext:
    """Scores item (code - 1) highest in context `code`, else item 3: a hand-checkable ranking."""

    def score(self, users, stage):
        return torch.tensor([[0.0, 0.0, 0.0, 1.0]]).repeat(len(users), 1)

    def score_in_context(self, users, codes, stage):
        scores = torch.zeros(len(users), 4)
        scores[torch.arange(len(users)), torch.from_numpy(codes["page"] - 1)] = 1.0
        return scores


def test_evaluation_ranks_per_request_with_context(tmp_path):
    from csmf.data.schema import CascadeData

    test = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float32))
    empty = sp.csr_matrix((2, 4), dtype=np.float32)
    ctx = {"page": sp.csr_matrix(np.array([[1, 2, 0, 0], [0, 0, 2, 0]], dtype=np.int64))}
    data = CascadeData(name="t", stages=("click",), n_users=2, n_items=4, train={"click": empty}, valid={},
                       test={"click": test}, exclude={"click": ("click",)}, context=ctx)  # fmt: skip
    # requests: (user 0, page 1) -> item 0, (user 0, page 2) -> item 1, (user 1, page 2) -> item 2
    got = evaluate_stage(_ByContext(), data, "click", ks=(1,))
    assert got["requests"] == 3 and got["users"] == 2
    assert got["recall@1"] == pytest.approx(2 / 3)  # item 0 in page 1 and item 1 in page 2 hit; user 1 misses

    class Plain:  # no score_in_context: every request of a user gets the user's one ranking
        score = _ByContext.score

    assert evaluate_stage(Plain(), data, "click", ks=(1,))["recall@1"] == 0.0  # item 3 first everywhere


def _sim_cfg(**sim) -> Config:
    cfg = override(Config(), ["model.encoder=mlp", "model.dim=32", "train.full_softmax_max_items=0",
                              "train.aux_weight=0", "train.distill=", "train.max_epochs=3", "train.patience=1",
                              "train.lr=0.003", "cascade.min_share=0", "data.dataset=sim"])  # fmt: skip
    return replace(cfg, sim=replace(cfg.sim, n_users=500, n_items=400, exposures_per_user=30, **sim))


@pytest.fixture(scope="module")
def scenario_data():
    cfg = _sim_cfg(scenarios=4, scenario_strength=1.0)
    return cfg, load_dataset(cfg)


def test_context_tables_are_owned_units_that_earlier_stages_keep(scenario_data):
    cfg, data = scenario_data
    assert sorted(data.context) == ["scenario"]
    model = build_backbone(data, cfg, seed=0)
    model.set_history(data.train)
    assert model.reads_context
    table = model.user.ctx_emb["scenario"]
    assert table.weight.shape[0] == 5  # four scenarios and unknown
    names = [name for name, _, _ in model.prunable()]
    assert len(names) == len(set(names)) and any(owner is table.owner for _, _, owner in model.prunable())
    for _, _, owner in model.prunable():  # stage 1 keeps half of every unit group, stage 2 claims the rest
        owner[owner.numel() // 2 :] = 0
    model.sync_output_owner()
    claim(model, 2)
    before = table.weight.detach().clone()
    codes = {"scenario": np.array([1, 2, 3, 4])}
    u = model.user_vectors(np.arange(4), 2, context=codes)
    u.sum().backward()
    model.mask_grads(2)
    with torch.no_grad():
        table.weight -= 0.1 * table.weight.grad
    kept = table.owner == 1
    assert torch.equal(table.weight[:, kept], before[:, kept])  # stage 1's columns did not move
    assert not torch.equal(table.weight[:, ~kept], before[:, ~kept])


def test_unknown_and_unseen_context_read_row_zero(scenario_data):
    cfg, data = scenario_data
    model = build_backbone(data, cfg, seed=0).eval()
    model.set_history(data.train)
    users = np.arange(3)
    unknown = model.user_vectors(users, 1)
    assert torch.equal(unknown, model.user_vectors(users, 1, context={"scenario": np.zeros(3, dtype=np.int64)}))
    assert torch.equal(unknown, model.user_vectors(users, 1, context={"scenario": np.full(3, 99)}))
    assert not torch.equal(unknown, model.user_vectors(users, 1, context={"scenario": np.ones(3, dtype=np.int64)}))


def test_scenarios_that_carry_signal_make_the_context_model_rank_requests_better(scenario_data, tmp_path):
    cfg, data = scenario_data
    with_ctx = CSMF(cfg).fit(data)
    without = CSMF(replace(cfg, data=replace(cfg.data, context_features=()))).fit(
        load_dataset(replace(cfg, data=replace(cfg.data, context_features=())))
    )
    for stage in data.stages:
        a = evaluate_stage(with_ctx, data, stage, ks=(50,))
        b = evaluate_stage(without, data, stage, ks=(50,))
        assert a["requests"] == b["requests"] > a["users"]
        assert a["recall@50"] > 1.1 * b["recall@50"], stage
    # saved and loaded, it ranks each request exactly as before
    with_ctx.save(tmp_path / "m")
    loaded = CSMF.load(tmp_path / "m")
    codes = {"scenario": np.array([1, 2, 3, 0])}
    users = np.array([0, 0, 1, 2])
    assert torch.equal(loaded.score_in_context(users, codes, "click"), with_ctx.score_in_context(users, codes, "click"))


def test_pairs_and_their_context_are_read_as_int32_in_row_then_column_order():
    from csmf.data.batches import pairs_of
    from csmf.data.context import lookup

    rng = np.random.default_rng(3)
    users, items = rng.integers(0, 50, 400), rng.integers(0, 70, 400)
    mat = sp.csr_matrix((np.ones(400), (users, items)), shape=(50, 70))
    mat.indices = mat.indices.copy()
    shuffled = mat.copy()  # the same entries with each row's columns reversed: indices no longer sorted
    for r in range(50):
        a, b = shuffled.indptr[r], shuffled.indptr[r + 1]
        shuffled.indices[a:b], shuffled.data[a:b] = shuffled.indices[a:b][::-1], shuffled.data[a:b][::-1]
    shuffled.has_sorted_indices = False
    coo = mat.tocoo()
    order = np.lexsort((coo.col, coo.row))
    for m in (mat, shuffled):
        u, i = pairs_of(m)
        assert u.dtype == i.dtype == np.int32
        assert np.array_equal(u, coo.row[order]) and np.array_equal(i, coo.col[order])
    codes = sp.csr_matrix((rng.integers(1, 9, 400), (users, items)), shape=(50, 70))
    got = lookup({"c": codes}, *pairs_of(mat))["c"]
    assert got.dtype == np.int32 and np.array_equal(got, np.asarray(codes[coo.row[order], coo.col[order]]).ravel())
