"""The Retriever contract, run on every baseline; input matrices; coordinate search."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from csmf.data.schema import CascadeData, pairs_to_csr
from csmf.experiments.tuning import coordinate_search
from csmf.models import ALS, ALSSettings, ItemKNN, ItemKNNSettings, Popularity
from csmf.models.base import input_matrix

FACTORS = 8


def make_popularity(stages):
    return Popularity()


def make_als(stages, seed=0):
    return ALS({s: ALSSettings(factors=FACTORS, iterations=3) for s in stages}, seed=seed, num_threads=1)


def make_itemknn(stages):
    return ItemKNN({s: ItemKNNSettings(neighbours=20) for s in stages}, num_threads=1)


MODELS = {"popularity": make_popularity, "als": make_als, "itemknn": make_itemknn}


@pytest.fixture(params=sorted(MODELS))
def model_name(request):
    return request.param


def all_scores(model, data: CascadeData) -> dict[str, torch.Tensor]:
    users = np.arange(data.n_users)
    return {s: model.score(users, s).clone() for s in data.stages}


def test_score_shape_dtype_and_rows(sim_data, model_name):
    model = MODELS[model_name](sim_data.stages).fit(sim_data)
    users = np.array([5, 2, 299, 0])
    for stage in sim_data.stages:
        scores = model.score(users, stage)
        assert scores.shape == (4, sim_data.n_items)
        assert scores.dtype == torch.float32
        assert torch.isfinite(scores).all()
        full = model.score(np.arange(sim_data.n_users), stage)
        torch.testing.assert_close(scores, full[torch.from_numpy(users)], rtol=1e-6, atol=1e-6)
    # Different objectives are different models (the stages have different train pairs).
    assert not torch.equal(model.score(users, "exposure"), model.score(users, "conversion"))


def test_fit_is_deterministic(sim_data, model_name):
    a = all_scores(MODELS[model_name](sim_data.stages).fit(sim_data), sim_data)
    b = all_scores(MODELS[model_name](sim_data.stages).fit(sim_data), sim_data)
    for stage in sim_data.stages:
        assert torch.equal(a[stage], b[stage]), stage


def test_score_fused_is_the_weighted_sum(sim_data, model_name):
    model = MODELS[model_name](sim_data.stages).fit(sim_data)
    users = np.arange(0, sim_data.n_users, 7)
    fused = model.score_fused(users, {"click": 1.0, "conversion": 2.0})
    expected = model.score(users, "click") + 2.0 * model.score(users, "conversion")
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    # A zero weight drops that objective.
    only_conv = model.score_fused(users, {"click": 0.0, "conversion": 0.5})
    torch.testing.assert_close(only_conv, 0.5 * model.score(users, "conversion"), rtol=1e-6, atol=1e-6)


def test_num_params(sim_data, model_name):
    model = MODELS[model_name](sim_data.stages).fit(sim_data)
    if model_name == "als":
        per_stage = (sim_data.n_users + sim_data.n_items) * FACTORS
        assert model.num_params() == len(sim_data.stages) * per_stage == 3 * (300 + 200) * 8
    elif model_name == "itemknn":  # the neighbour weights it stores: at most K per item and objective
        assert 0 < model.num_params() == sum(m.nnz for m in model.similarity.values())
    else:
        assert model.num_params() == 0


def test_fit_never_reads_valid_or_test(sim_data, model_name):
    clean = all_scores(MODELS[model_name](sim_data.stages).fit(sim_data), sim_data)
    everything = sp.csr_matrix(np.ones((sim_data.n_users, sim_data.n_items), dtype=np.float32))
    poisoned = dataclasses.replace(
        sim_data,
        valid={s: everything for s in sim_data.stages},
        test={s: everything for s in sim_data.stages},
        valid_holdout=everything,
    )
    emptied = dataclasses.replace(sim_data, valid={}, test={}, valid_holdout=None)
    for data in (poisoned, emptied):
        scores = all_scores(MODELS[model_name](sim_data.stages).fit(data), sim_data)
        for stage in sim_data.stages:
            assert torch.equal(scores[stage], clean[stage]), stage


def test_fit_leaves_train_untouched(sim_data, model_name):
    before = {b: sim_data.matrix(b).copy() for b in sim_data.behaviours}
    MODELS[model_name](sim_data.stages).fit(sim_data)
    for b, mat in before.items():
        assert (sim_data.matrix(b) != mat).nnz == 0
        assert set(np.unique(sim_data.matrix(b).data).tolist()) == {1.0}


def test_popularity_scores_are_train_counts(sim_data):
    model = Popularity().fit(sim_data)
    for stage in sim_data.stages:
        counts = np.asarray(sim_data.train[stage].sum(axis=0)).ravel()
        scores = model.score(np.array([0, 1, 2]), stage).numpy()
        np.testing.assert_array_equal(scores, np.tile(counts, (3, 1)))


def test_als_factors_and_seed(sim_data):
    model = make_als(sim_data.stages).fit(sim_data)
    for stage in sim_data.stages:
        assert model.user_factors[stage].shape == (sim_data.n_users, FACTORS)
        assert model.item_factors[stage].shape == (sim_data.n_items, FACTORS)
        users = np.array([3, 1])
        torch.testing.assert_close(
            model.score(users, stage), model.user_factors[stage][[3, 1]] @ model.item_factors[stage].T
        )
    other = make_als(sim_data.stages, seed=1).fit(sim_data)
    assert not torch.equal(model.user_factors["click"], other.user_factors["click"])
    assert model.settings()["click"] == {
        "factors": FACTORS,
        "regularization": 0.1,
        "alpha": 10.0,
        "aux_weight": 0.1,
        "iterations": 3,
    }


def test_itemknn_scores_are_history_times_similarity(sim_data):
    model = ItemKNN({"click": ItemKNNSettings(similarity="cosine", neighbours=10, aux_weight=0.0)}).fit(sim_data)
    users = np.array([0, 10, 20])
    expected = (sim_data.train["click"][users] @ model.similarity["click"]).toarray()
    np.testing.assert_allclose(model.score(users, "click").numpy(), expected, rtol=1e-6)
    # K = 10 neighbours kept per item.
    assert np.diff(model.similarity["click"].indptr).max() <= 10
    with pytest.raises(ValueError, match="'bm25' or 'cosine'"):
        ItemKNN({"click": ItemKNNSettings(similarity="jaccard")}).fit(sim_data)


def test_input_matrix_weights_other_behaviours():
    def csr(pairs):
        return pairs_to_csr(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]), 2, 3)

    data = CascadeData(
        name="hand",
        stages=("view", "buy"),
        n_users=2,
        n_items=3,
        train={"view": csr([(0, 0), (0, 1), (1, 2)]), "buy": csr([(0, 1)])},
        valid={},
        test={},
        exclude={"view": ("view",), "buy": ("buy",)},
        side={"fav": csr([(1, 0), (0, 1)])},
    )
    # view + 0.5 * (buy + fav): (0,1) = 1 + 0.5 + 0.5; (1,0) = 0.5 (fav only).
    np.testing.assert_allclose(input_matrix(data, "view", 0.5).toarray(), [[1, 2, 0], [0.5, 0, 1]])
    # buy + 0.25 * (view + fav): (0,1) = 1 + 0.25 + 0.25.
    np.testing.assert_allclose(input_matrix(data, "buy", 0.25).toarray(), [[0.25, 1.5, 0], [0.25, 0, 0.25]])
    # aux_weight 0: the stage's own pairs only.
    np.testing.assert_array_equal(input_matrix(data, "buy", 0.0).toarray(), [[0, 1, 0], [0, 0, 0]])
    assert input_matrix(data, "view", 0.5).dtype == np.float32


# ----- coordinate search --------------------------------------------------------------------------


def test_coordinate_search_finds_the_max_of_a_separable_function():
    calls: list[tuple[int, int]] = []

    def f(p):
        calls.append((p["x"], p["y"]))
        return -((p["x"] - 2) ** 2) - (p["y"] - 3) ** 2

    grid = {"x": [0, 1, 2, 3, 4], "y": [0, 1, 2, 3, 4, 5]}
    result = coordinate_search(grid, f, start={"x": 0, "y": 0})
    assert result.best == {"x": 2, "y": 3}
    assert result.best_value == 0.0
    # Each point once: start (0,0); x sweep adds 4; y sweep at x=2 adds 5; the second round's x sweep
    # at y=3 adds 4 and its y sweep is all cached; nothing changed, so it stops: 1 + 4 + 5 + 4 = 14.
    assert len(calls) == len(set(calls)) == 14
    assert [t["params"] for t in result.trials] == [{"x": x, "y": y} for x, y in calls]
    assert result.as_dict("m")["best"] == {"x": 2, "y": 3}


def test_a_capped_coordinate_search_stops_after_its_fits_in_the_search_order():
    f = lambda p: -((p["x"] - 2) ** 2) - (p["y"] - 3) ** 2  # noqa: E731
    grid = {"x": [0, 1, 2, 3, 4], "y": [0, 1, 2, 3, 4, 5]}
    full = coordinate_search(grid, f, start={"x": 0, "y": 0})
    capped = coordinate_search(grid, f, start={"x": 0, "y": 0}, max_fits=7)
    assert capped.trials == full.trials[:7] and capped.capped and not full.capped
    # (0,0), x = 1..4 (best x = 2), then y = 1, 2 at x = 2: the best of those seven points
    assert capped.best == {"x": 2, "y": 2} and capped.best_value == -1.0
    assert capped.as_dict("m")["capped"] is True and "capped" not in full.as_dict("m")
    assert coordinate_search(grid, f, start={"x": 0, "y": 0}, max_fits=100).trials == full.trials


def test_coordinate_search_ties_keep_the_incumbent():
    result = coordinate_search({"x": [0, 1, 2, 3]}, lambda p: 1.0, start={"x": 2})
    assert result.best == {"x": 2}
    assert len(result.trials) == 4
    # A plateau: the first point that reaches it wins, later equal points do not replace it.
    result = coordinate_search({"x": [0, 1, 2, 3, 4]}, lambda p: float(p["x"] >= 2), start={"x": 0})
    assert result.best == {"x": 2}
    assert result.best_value == 1.0
    again = coordinate_search({"x": [0, 1, 2, 3, 4]}, lambda p: float(p["x"] >= 2), start={"x": 0})
    assert again.best == result.best and again.trials == result.trials


def test_coordinate_search_respects_max_rounds():
    # x may exceed y by at most 1 and vice versa, so each sweep can climb only one or two steps.
    def f(p):
        x, y = p["x"], p["y"]
        return x + y - 10 * max(0, x - y - 1) - 10 * max(0, y - x - 1)

    grid = {"x": [0, 1, 2, 3], "y": [0, 1, 2, 3]}
    # Round 1: x -> 1 (x <= y + 1), then y -> 2 (y <= x + 1). Round 2: x -> 3, y -> 3.
    one = coordinate_search(grid, f, start={"x": 0, "y": 0}, max_rounds=1)
    assert (one.best, one.best_value) == ({"x": 1, "y": 2}, 3.0)
    two = coordinate_search(grid, f, start={"x": 0, "y": 0}, max_rounds=2)
    assert (two.best, two.best_value) == ({"x": 3, "y": 3}, 6.0)
    many = coordinate_search(grid, f, start={"x": 0, "y": 0}, max_rounds=10)
    assert many.best == two.best
    # Round 3 finds nothing new and stops; every point is still evaluated once.
    points = [tuple(sorted(t["params"].items())) for t in many.trials]
    assert len(points) == len(set(points))
