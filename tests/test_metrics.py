"""Recall@K / NDCG@K arithmetic, and full-catalogue evaluation of a fixed-score retriever."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from csmf.data.schema import CascadeData, pairs_to_csr
from csmf.evaluation import batch_size_for, evaluate
from csmf.metrics import discounts, recall_ndcg
from csmf.retriever import Retriever

LOG2_3 = math.log2(3)  # 1/log2(3) = 0.6309297535714575
INV = {r: 1 / math.log2(r + 1) for r in range(1, 11)}  # discount of rank r


def test_discounts_are_one_over_log2_rank_plus_one():
    np.testing.assert_allclose(discounts(4), [1.0, 1 / LOG2_3, 0.5, 1 / math.log2(5)])


def test_recall_ndcg_hand_computed():
    hits = np.array(
        [
            # A: 3 positives, hits at ranks 1 and 3.
            [1, 0, 1, 0, 0],
            # B: 10 positives (more than K=5), hits at ranks 2, 3, 4, 5.
            [0, 1, 1, 1, 1],
            # C: 1 positive, hit at rank 5.
            [0, 0, 0, 0, 1],
            # D: 2 positives, no hit.
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    n_pos = np.array([3, 10, 1, 2])
    out = recall_ndcg(hits, n_pos, ks=(1, 3, 5))

    # A: recall@1 = 1/3, recall@3 = recall@5 = 2/3.
    #    DCG@5 = 1/log2(2) + 1/log2(4) = 1 + 0.5 = 1.5.
    #    IDCG@5 = IDCG@3 = 1 + 1/log2(3) + 1/log2(4) = 2.1309297535714578 (3 positives -> 3 ideal hits).
    #    NDCG@5 = NDCG@3 = 1.5 / 2.1309... = 0.7039180890341348; NDCG@1 = 1/1 = 1.
    # B: recall@1 = 0, recall@3 = 2/10, recall@5 = 4/10.
    #    DCG@5 = 1/log2(3) + 1/log2(4) + 1/log2(5) + 1/log2(6) = 0.63093 + 0.5 + 0.43068 + 0.38685 = 1.94846.
    #    IDCG@5 uses min(10, 5) = 5 hits: 1 + 0.63093 + 0.5 + 0.43068 + 0.38685 = 2.94846; NDCG@5 = 0.66084.
    #    DCG@3 = 0.63093 + 0.5 = 1.13093; IDCG@3 = 1 + 0.63093 + 0.5 = 2.13093.
    # C: recall@5 = 1, NDCG@5 = (1/log2(6)) / 1 = 0.38685; nothing in the top 3.
    # D: all zero.
    idcg_a = 1 + 1 / LOG2_3 + 0.5
    assert idcg_a == pytest.approx(2.1309297535714578)
    dcg_b5 = INV[2] + INV[3] + INV[4] + INV[5]
    idcg_b5 = 1 + INV[2] + INV[3] + INV[4] + INV[5]
    assert dcg_b5 == pytest.approx(1.9484591188793587)
    assert idcg_b5 == pytest.approx(2.9484591188793587)

    np.testing.assert_allclose(out["recall@1"], [1 / 3, 0, 0, 0])
    np.testing.assert_allclose(out["recall@3"], [2 / 3, 0.2, 0, 0])
    np.testing.assert_allclose(out["recall@5"], [2 / 3, 0.4, 1.0, 0])
    np.testing.assert_allclose(out["ndcg@1"], [1.0, 0, 0, 0])
    np.testing.assert_allclose(out["ndcg@3"], [1.5 / idcg_a, (INV[2] + INV[3]) / idcg_a, 0, 0])
    np.testing.assert_allclose(out["ndcg@5"], [1.5 / idcg_a, dcg_b5 / idcg_b5, INV[5], 0])
    np.testing.assert_allclose(out["ndcg@5"][:3], [0.7039180890341348, 0.6608398, 0.3868528], rtol=1e-6)
    assert set(out) == {"recall@1", "ndcg@1", "recall@3", "ndcg@3", "recall@5", "ndcg@5"}


def test_ndcg_reaches_one_when_all_positives_are_on_top():
    # 2 positives at ranks 1 and 2: DCG = IDCG = 1 + 1/log2(3), whatever K >= 2.
    out = recall_ndcg(np.array([[1, 1, 0, 0]], dtype=bool), np.array([2]), ks=(2, 4))
    np.testing.assert_allclose(out["ndcg@2"], [1.0])
    np.testing.assert_allclose(out["ndcg@4"], [1.0])
    np.testing.assert_allclose(out["recall@4"], [1.0])


def test_recall_ndcg_rejects_users_without_positives():
    with pytest.raises(ValueError, match="at least one positive"):
        recall_ndcg(np.zeros((2, 5), dtype=bool), np.array([1, 0]), ks=(5,))


def test_recall_ndcg_rejects_too_few_ranked_items():
    with pytest.raises(ValueError, match="need at least 10 ranked items per user, got 5"):
        recall_ndcg(np.zeros((1, 5), dtype=bool), np.array([1]), ks=(5, 10))


# ----- evaluate() end to end ----------------------------------------------------------------------

# 3 users x 6 items. Stage "s": user 2 has no test positive. Stage "t" excludes only its own train.
SCORES = np.array(
    [
        [10, 9, 8, 7, 6, 5],  # user 0
        [0, 1, 9, 3, 4, 10],  # user 1
        [1, 9, 8, 7, 6, 5],  # user 2 (no "s" test positive: must not be scored for "s")
    ],
    dtype=np.float32,
)


class FixedScores(Retriever):
    name = "fixed"

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def fit(self, data: CascadeData) -> FixedScores:
        return self

    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        self.calls.append((stage, [int(u) for u in users]))
        return torch.from_numpy(SCORES[np.asarray(users)])


def tiny_cascade() -> CascadeData:
    def csr(pairs):
        users = np.array([u for u, _ in pairs], dtype=np.int64)
        items = np.array([i for _, i in pairs], dtype=np.int64)
        return pairs_to_csr(users, items, 3, 6)

    return CascadeData(
        name="tiny",
        stages=("s", "t"),
        n_users=3,
        n_items=6,
        # s train: user 0 item 0 and user 1 item 5 are the top-scored items of those users.
        train={"s": csr([(0, 0), (1, 5), (2, 1)]), "t": csr([(2, 2)])},
        valid={"s": csr([]), "t": csr([])},
        test={"s": csr([(0, 1), (0, 3), (1, 2)]), "t": csr([(0, 0)])},
        exclude={"s": ("s",), "t": ("t",)},
    )


def test_evaluate_excludes_training_items_and_averages_over_test_users():
    model = FixedScores()
    result = evaluate(model, tiny_cascade(), ks=(1, 2, 5))

    # Stage s, user 0: item 0 (score 10) is a training item and is excluded, so the ranking is
    # 1, 2, 3, 4, 5; positives {1, 3} sit at ranks 1 and 3.
    #   recall@1 = 1/2, recall@2 = 1/2, recall@5 = 2/2.
    #   ndcg@1 = 1; ndcg@2 = 1 / (1 + 1/log2(3)); ndcg@5 = (1 + 1/log2(4)) / (1 + 1/log2(3)).
    # Stage s, user 1: item 5 (score 10) is excluded; positive item 2 (score 9) gets rank 1.
    #   recall@K = 1 and ndcg@K = 1 for every K.
    # User 2 has no s test positive: not scored and not in the average (2 users, not 3).
    idcg2 = 1 + 1 / LOG2_3
    s = result["s"]
    assert s["users"] == 2
    assert s["recall@1"] == pytest.approx((0.5 + 1) / 2)
    assert s["recall@2"] == pytest.approx((0.5 + 1) / 2)
    assert s["recall@5"] == pytest.approx((1 + 1) / 2)
    assert s["ndcg@1"] == pytest.approx((1 + 1) / 2)
    assert s["ndcg@2"] == pytest.approx((1 / idcg2 + 1) / 2)
    assert s["ndcg@5"] == pytest.approx((1.5 / idcg2 + 1) / 2)

    # Stage t excludes only t's train (user 2 item 2), so user 0's item 0 is rankable and is the
    # one test positive at rank 1: every metric is 1, over 1 user.
    t = result["t"]
    assert t["users"] == 1
    assert all(t[f"{m}@{k}"] == pytest.approx(1.0) for m in ("recall", "ndcg") for k in (1, 2, 5))

    scored_s = sorted(u for stage, users in model.calls if stage == "s" for u in users)
    assert scored_s == [0, 1]


def test_rankings_exclude_the_union_of_several_matrices_read_by_rows():
    """evaluate reads the excluded pairs a block of users at a time (RowUnion) instead of building the union: the
    same pairs for any rows, in any order, and the same metrics."""
    data = tiny_cascade()
    data.exclude["s"] = ("s", "t")  # user 2's item 2 (t's train) is excluded from s too
    whole = data.excluded("s")
    for rows in ([2, 0], [1], [0, 1, 2], [2, 2, 1]):
        got = data.excluded_rows("s")[np.array(rows)]
        assert (got != whole[np.array(rows)]).nnz == 0 and got.shape == (len(rows), 6)
    data.test["s"] = pairs_to_csr(np.array([2, 2]), np.array([2, 3]), 3, 6)  # user 2: items 2 and 3
    # user 2's scores rank 1, 2, 3, ...; item 1 is s's train and item 2 t's: item 3 comes first, item 2 never
    s = evaluate(FixedScores(), data, ks=(1, 3))["s"]  # 4 items left to rank: K below that
    assert s["users"] == 1 and s["recall@1"] == pytest.approx(0.5) and s["recall@3"] == pytest.approx(0.5)


def test_evaluate_skips_stages_without_test_pairs():
    data = tiny_cascade()
    data.test["t"] = pairs_to_csr(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 3, 6)
    result = evaluate(FixedScores(), data, ks=(1, 5))
    assert set(result) == {"s"}


def test_evaluate_batch_size_does_not_change_results():
    assert batch_size_for(6, 0) == 1
    assert batch_size_for(6, 256) > 3
    # 1 MB over 2**17 items at 8 bytes per cell is exactly one user per batch.
    assert batch_size_for(2**17, 1) == 1
    assert batch_size_for(2**16, 1) == 2
    assert batch_size_for(1_000_000, 256) == 33  # README: about 33 users per batch at 1M items

    big, small = FixedScores(), FixedScores()
    large_budget = evaluate(big, tiny_cascade(), ks=(1, 2, 5), budget_mb=256)
    tiny_budget = evaluate(small, tiny_cascade(), ks=(1, 2, 5), budget_mb=0)
    assert tiny_budget == large_budget
    assert [len(users) for stage, users in small.calls if stage == "s"] == [1, 1]
    assert [len(users) for stage, users in big.calls if stage == "s"] == [2]


def test_a_validation_sample_ranks_that_many_users_the_same_ones_for_a_seed():
    from csmf.evaluation import evaluate_stage

    data = tiny_cascade()  # stage s: users 0 (recall@1 1/2) and 1 (recall@1 1) have test positives
    whole = evaluate_stage(FixedScores(), data, "s", ks=(1,), sample=0)
    assert whole["users"] == 2 and evaluate_stage(FixedScores(), data, "s", ks=(1,), sample=5) == whole
    drawn = {}
    for seed in range(12):
        model = FixedScores()
        one = evaluate_stage(model, data, "s", ks=(1,), sample=1, seed=seed)
        (user,) = [u for _, users in model.calls for u in users]
        assert one["users"] == 1 and one["recall@1"] == {0: 0.5, 1: 1.0}[user]  # that user's own metric
        assert evaluate_stage(FixedScores(), data, "s", ks=(1,), sample=1, seed=seed) == one
        drawn[seed] = user
    assert set(drawn.values()) == {0, 1}  # the seed decides which


def test_score_fused_with_all_zero_weights_is_an_error():
    with pytest.raises(ValueError, match="all objective weights are zero"):
        FixedScores().score_fused(np.array([0]), {"s": 0.0, "t": 0.0})


class TwoStageScores(FixedScores):
    def score(self, users: np.ndarray, stage: str) -> torch.Tensor:
        block = SCORES[np.asarray(users)]
        return torch.from_numpy(block if stage == "s" else block[:, ::-1].copy())


def test_top_overlap_matches_a_hand_count_for_any_batch_size():
    """top_overlap reads seen items by rows and counts exactly: the same share with one user a batch or all."""
    from csmf.experiments.sweep import top_overlap

    data = tiny_cascade()  # seen (s and t train): user 0 {0}, user 1 {5}, user 2 {1, 2}; test users 0, 1 of s and t
    # top 3, seen items excluded: user 0 s {1, 2, 3}, t (reversed scores) {5, 4, 3}; user 1 s {2, 4, 3}, t {0, 3, 1}
    expected = (1 + 1) / 3 / 2  # item 3 in both lists of each user
    assert top_overlap(TwoStageScores(), data, "s", "t", k=3, budget_mb=0) == pytest.approx(expected)
    assert top_overlap(TwoStageScores(), data, "s", "t", k=3, budget_mb=256) == pytest.approx(expected)
