"""Every split obeys the leak rule; hold-outs have the documented sizes and are fixed by their seed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp

from csmf.data.schema import (
    CascadeData,
    CascadeLog,
    LoadReport,
    difference,
    intersection,
    leak_violations,
    pairs_to_csr,
    union,
)
from csmf.data.split import finish_report, holdout_order, per_user_holdout, split_jd, split_log

JD_STAGE_SETS = [
    ("view", "purchase"),
    ("interact", "view", "favorite", "purchase"),
    ("view", "favorite", "purchase"),
    ("purchase",),
    ("interact", "purchase"),
]


def same(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    return a.shape == b.shape and (a != b).nnz == 0


def per_user(mat: sp.csr_matrix) -> np.ndarray:
    return np.diff(mat.indptr)


def expected_holdout(n: np.ndarray, frac: float) -> np.ndarray:
    """The documented hold-out size: users with < 2 pairs keep all, else clip(round(frac*n), 1, n-1)."""
    n = np.asarray(n, dtype=np.int64)
    return np.where(n >= 2, np.clip(np.rint(frac * n), 1, np.maximum(n - 1, 1)), 0).astype(np.int64)


# ----- holdout_order ------------------------------------------------------------------------------


def test_holdout_order_counts_and_smallest_keys():
    n_per_user = np.array([0, 1, 2, 3, 5, 10, 11])
    # frac 0.2: n=2 -> round(0.4)=0 -> at least 1; n=3 -> round(0.6)=1; n=5 -> 1; n=10 -> 2; n=11 -> round(2.2)=2.
    expected = np.array([0, 0, 1, 1, 1, 2, 2])
    rng = np.random.default_rng(7)
    keys = rng.random(n_per_user.sum())
    mask = holdout_order(n_per_user, 0.2, keys)
    owner = np.repeat(np.arange(len(n_per_user)), n_per_user)
    np.testing.assert_array_equal(np.bincount(owner[mask], minlength=len(n_per_user)), expected)
    # The held pairs of each user are exactly those with the smallest keys.
    for u in range(len(n_per_user)):
        k = keys[owner == u]
        held = mask[owner == u]
        if held.any() and (~held).any():
            assert k[held].max() < k[~held].min()


def test_holdout_order_never_holds_out_everything():
    n_per_user = np.array([2, 3, 4])
    # frac 0.9: n=2 -> round(1.8)=2 -> clipped to n-1 = 1; n=3 -> 3 -> 2; n=4 -> round(3.6)=4 -> 3.
    mask = holdout_order(n_per_user, 0.9, np.arange(9, dtype=float))
    owner = np.repeat(np.arange(3), n_per_user)
    np.testing.assert_array_equal(np.bincount(owner[mask]), [1, 2, 3])
    # Keys are increasing within each user, so the first pairs of each user are the held ones.
    np.testing.assert_array_equal(mask, [True, False, True, True, False, True, True, True, False])


def test_holdout_order_matches_formula_on_many_users():
    rng = np.random.default_rng(0)
    n_per_user = rng.integers(0, 40, size=500)
    mask = holdout_order(n_per_user, 0.2, rng.random(n_per_user.sum()))
    owner = np.repeat(np.arange(500), n_per_user)
    got = np.bincount(owner[mask], minlength=500)
    np.testing.assert_array_equal(got, expected_holdout(n_per_user, 0.2))


# ----- JD -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stages", JD_STAGE_SETS, ids=lambda s: "-".join(s))
def test_jd_split_has_no_leaks(jd_files, stages):
    data = split_jd(jd_files, stages=stages)
    assert data.stages == stages
    assert leak_violations(data) == []
    # The purchase test is the published file, untouched.
    if "purchase" in stages:
        assert same(data.test["purchase"], jd_files["tst_buy"])
        assert same(data.valid["purchase"], jd_files["vld_buy"])
        assert same(data.train["purchase"], jd_files["trn_buy"])
    # Every test pair is new for the whole training history of that user (excluded items are train).
    for s in stages:
        assert intersection(data.test[s], data.train[s]).nnz == 0
        assert data.test[s].nnz > 0


def test_jd_click_test_is_protected_and_sized(jd_files):
    data = split_jd(jd_files, seed=0)
    pv, buy, fav = jd_files["trn_pv"], jd_files["trn_buy"], jd_files["trn_fav"]
    view_test, view_train = data.test["view"], data.train["view"]
    assert intersection(view_test, buy).nnz == 0
    assert intersection(view_test, fav).nnz == 0
    assert intersection(view_test, view_train).nnz == 0
    assert same(union(view_train, view_test), pv)
    assert set(data.side) == {"favorite"} and same(data.side["favorite"], fav)

    # Before protection: exactly clip(round(0.2 n), 1, n-1) of each user's trn_pv pairs (n >= 2).
    _, held = per_user_holdout(pv, 0.2, seed=0)
    np.testing.assert_array_equal(per_user(held), expected_holdout(per_user(pv), 0.2))
    # Protection only returns held pairs that are purchases or favorites to the click train.
    assert same(view_test, difference(held, union(buy, fav)))
    assert (per_user(view_test) <= per_user(held)).all()
    share = view_test.nnz / pv.nnz
    assert 0.12 < share < 0.2  # 20% held out, minus the protected ones


def test_jd_favorite_stage_protection(jd_files):
    data = split_jd(jd_files, stages=("view", "favorite", "purchase"))
    buy = jd_files["trn_buy"]
    assert data.side == {}
    assert intersection(data.test["favorite"], buy).nnz == 0
    assert intersection(data.valid["favorite"], buy).nnz == 0
    assert intersection(data.test["view"], data.train["favorite"]).nnz == 0
    assert same(union(data.train["favorite"], data.test["favorite"]), jd_files["trn_fav"])


def test_jd_interact_test_is_new_for_every_behaviour(jd_files):
    data = split_jd(jd_files, stages=("interact", "view", "favorite", "purchase"))
    history = union(*(data.matrix(b) for b in data.behaviours))
    assert intersection(data.test["interact"], history).nnz == 0
    assert same(data.train["interact"], union(data.train["view"], data.train["favorite"], jd_files["trn_buy"]))
    assert intersection(data.valid["interact"], data.test["interact"]).nnz == 0


def test_jd_side_behaviours_and_names(jd_files):
    default = split_jd(jd_files)
    assert default.name == "jd"
    assert set(default.side) == {"favorite"}
    # Purchases alone: no click test exists, so every trn_pv pair is side training data.
    only_buy = split_jd(jd_files, stages=("purchase",))
    assert only_buy.name == "jd-purchase"
    assert set(only_buy.side) == {"view", "favorite"}
    assert same(only_buy.side["view"], jd_files["trn_pv"])
    assert same(only_buy.side["favorite"], jd_files["trn_fav"])
    # An interaction stage needs the click hold-out: held-out views stay out of the side views.
    interact = split_jd(jd_files, stages=("interact", "purchase"))
    assert interact.name == "jd-interact-purchase"
    assert set(interact.side) == {"view", "favorite"}
    assert intersection(interact.side["view"], interact.test["interact"]).nnz == 0
    assert interact.side["view"].nnz < jd_files["trn_pv"].nnz
    assert split_jd(jd_files, stages=("view", "favorite", "purchase")).name == "jd-view-favorite-purchase"


def test_jd_split_is_fixed_by_its_seed(jd_files):
    a = split_jd(jd_files, seed=0)
    b = split_jd(jd_files, seed=0)
    c = split_jd(jd_files, seed=1)
    for part in ("train", "valid", "test"):
        assert same(getattr(a, part)["view"], getattr(b, part)["view"])
    assert not same(a.test["view"], c.test["view"])
    assert not same(a.valid["view"], c.valid["view"])
    assert same(a.test["purchase"], c.test["purchase"])  # the published file does not depend on the seed


def test_jd_tuning_view_removes_the_tuning_fold_from_every_train_matrix(jd_files):
    data = split_jd(jd_files)
    hold = data.valid_holdout
    assert hold is not None and hold.nnz > 0
    assert same(hold, data.valid["view"])  # favorite is side data here, so only the view fold
    tv = data.tuning_view()
    assert set(tv.test) == set(data.valid)
    assert all(same(tv.test[s], data.valid[s]) for s in data.valid)
    assert tv.valid == {}
    for name in data.behaviours:
        assert intersection(tv.matrix(name), hold).nnz == 0
        assert same(tv.matrix(name), difference(data.matrix(name), hold))
    assert tv.train["view"].nnz == data.train["view"].nnz - hold.nnz
    assert leak_violations(tv) == []


def test_jd_rejects_bad_stage_lists(jd_files):
    with pytest.raises(ValueError, match="are chosen from"):
        split_jd(jd_files, stages=("view", "click"))
    with pytest.raises(ValueError, match="cascade order"):
        split_jd(jd_files, stages=("purchase", "view"))
    with pytest.raises(ValueError, match="repeat"):
        split_jd(jd_files, stages=("view", "view"))


# ----- generic logs -------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["random", "time"])
def test_split_log_has_no_leaks_and_partitions_each_stage(sim_log, by):
    data = split_log(sim_log, test_frac=0.2, valid_frac=0.1, seed=0, by=by)
    assert leak_violations(data) == []
    for k, s in enumerate(sim_log.stages):
        full = sim_log.stage_matrix(s)
        assert same(union(data.train[s], data.test[s]), full)
        assert intersection(data.train[s], data.test[s]).nnz == 0
        assert same(intersection(data.valid[s], data.train[s]), data.valid[s])  # valid is a fold of train
        assert intersection(data.valid[s], data.test[s]).nnz == 0
        assert data.test[s].nnz > 0
        assert sim_log.labels[:, k].sum() == full.nnz
    # A held-out row is a test pair of every stage it is positive in: test click pairs are test
    # exposures, so no stage trains on a pair that another stage tests.
    all_train = union(*data.train.values())
    for s in sim_log.stages:
        assert intersection(data.test[s], all_train).nnz == 0
    assert data.report.cold_test_users == {s: 0 for s in sim_log.stages}


def test_split_log_random_holdout_sizes(sim_log):
    data = split_log(sim_log, test_frac=0.2, valid_frac=0.1, seed=0)
    # Every simulated row is an exposure, so exposure counts are row counts.
    n = per_user(sim_log.stage_matrix("exposure"))
    held = expected_holdout(n, 0.2)
    np.testing.assert_array_equal(per_user(data.test["exposure"]), held)
    np.testing.assert_array_equal(per_user(data.valid["exposure"]), expected_holdout(n - held, 0.1))
    assert same(data.valid_holdout, data.valid["exposure"])


def test_split_log_is_fixed_by_its_seed(sim_log):
    a = split_log(sim_log, seed=0)
    b = split_log(sim_log, seed=0)
    c = split_log(sim_log, seed=1)
    for s in sim_log.stages:
        assert same(a.test[s], b.test[s]) and same(a.valid[s], b.valid[s]) and same(a.train[s], b.train[s])
    assert not same(a.test["exposure"], c.test["exposure"])
    assert not same(a.valid["exposure"], c.valid["exposure"])


def test_split_log_time_holds_out_latest_rows_of_simulated_log(sim_log):
    data = split_log(sim_log, test_frac=0.2, valid_frac=0.1, by="time")
    ts = sp.csr_matrix((sim_log.timestamps, (sim_log.users, sim_log.items)), shape=(sim_log.n_users, sim_log.n_items))
    test, train_only = data.test["exposure"], difference(data.train["exposure"], data.valid["exposure"])
    valid = data.valid["exposure"]
    checked = 0
    for u in range(sim_log.n_users):
        t_test = ts[u, test[u].indices].toarray().ravel()
        t_valid = ts[u, valid[u].indices].toarray().ravel()
        t_train = ts[u, train_only[u].indices].toarray().ravel()
        if len(t_test) and len(t_train):
            assert t_test.min() >= t_train.max()
            checked += 1
        if len(t_valid) and len(t_train):
            assert t_valid.min() >= t_train.max()
        if len(t_valid) and len(t_test):
            assert t_test.min() >= t_valid.max()
    assert checked > 250


def hand_log(timestamps, n_users=1, stages=("click",)) -> CascadeLog:
    ts = np.asarray(timestamps, dtype=np.float64)
    n = len(ts)
    return CascadeLog(
        stages=stages,
        n_users=n_users,
        n_items=n,
        users=np.zeros(n, dtype=np.int32),
        items=np.arange(n, dtype=np.int32),
        labels=np.ones((n, len(stages)), dtype=bool),
        timestamps=ts,
    )


def test_split_log_time_on_a_hand_built_log():
    # One user, items 0..4 logged at times 30, 10, 50, 20, 40: with test_frac 0.2 the latest row
    # (item 2, t=50) is the test pair; valid_frac 0.25 of the remaining 4 is the next latest (item 4).
    log = hand_log([30, 10, 50, 20, 40])
    for seed in (0, 1, 2):
        data = split_log(log, test_frac=0.2, valid_frac=0.25, seed=seed, by="time")
        assert data.test["click"].indices.tolist() == [2]
        assert data.valid["click"].indices.tolist() == [4]
        assert sorted(data.train["click"].indices.tolist()) == [0, 1, 3, 4]
        assert leak_violations(data) == []


def test_split_log_time_breaks_ties_at_random_for_small_timestamps():
    log = hand_log([5.0] * 5)
    held = {tuple(split_log(log, test_frac=0.2, seed=seed, by="time").test["click"].indices) for seed in range(20)}
    assert len(held) > 1


def test_split_log_time_breaks_ties_at_random_for_unix_timestamps():
    log = hand_log([1_700_000_000.0] * 5)
    held = {tuple(split_log(log, test_frac=0.2, seed=seed, by="time").test["click"].indices) for seed in range(20)}
    assert len(held) > 1


def test_split_log_rejects_bad_options(sim_log):
    with pytest.raises(ValueError, match="'random' or 'time'"):
        split_log(sim_log, by="latest")
    no_time = dataclasses.replace(sim_log, timestamps=None)
    with pytest.raises(ValueError, match="needs a timestamp column"):
        split_log(no_time, by="time")


# ----- the leak check itself ----------------------------------------------------------------------


def test_leak_violations_reports_a_test_pair_in_a_later_stage_train(sim_data):
    assert leak_violations(sim_data) == []
    # A click test pair that is not a conversion pair: held-out rows are test pairs of every stage
    # they are positive in, so it is also an exposure test pair.
    candidates = difference(sim_data.test["click"], sim_data.test["conversion"]).tocoo()
    u, i = int(candidates.row[0]), int(candidates.col[0])
    leaky_pair = pairs_to_csr(np.array([u]), np.array([i]), sim_data.n_users, sim_data.n_items)
    leaky = dataclasses.replace(
        sim_data, train={**sim_data.train, "conversion": union(sim_data.train["conversion"], leaky_pair)}
    )
    assert sorted(leak_violations(leaky)) == [
        "1 click test pairs are in conversion train",
        "1 exposure test pairs are in conversion train",
    ]


def test_leak_violations_allows_earlier_stage_evidence():
    def csr(pairs):
        return pairs_to_csr(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]), 2, 3)

    data = CascadeData(
        name="hand",
        stages=("click", "buy"),
        n_users=2,
        n_items=3,
        # The buy test pair (0, 1) was clicked in training: legitimate earlier-stage evidence.
        train={"click": csr([(0, 0), (0, 1), (1, 2)]), "buy": csr([(0, 0)])},
        valid={},
        test={"click": csr([(1, 0)]), "buy": csr([(0, 1)])},
        exclude={"click": ("click", "buy"), "buy": ("buy",)},
    )
    assert leak_violations(data) == []
    # The click test pair (1, 0) inside buy train reveals the click: a leak.
    leaky = dataclasses.replace(data, train={**data.train, "buy": csr([(0, 0), (1, 0)])})
    assert leak_violations(leaky) == ["1 click test pairs are in buy train"]
    # A buy test pair inside buy train: a leak too.
    leaky = dataclasses.replace(data, train={**data.train, "buy": csr([(0, 0), (0, 1)])})
    assert leak_violations(leaky) == ["1 buy test pairs are in buy train"]


def test_leak_violations_reports_valid_test_overlap_and_untuned_valid_pairs(sim_data):
    test_pair = sim_data.test["click"]
    both = dataclasses.replace(sim_data, valid={**sim_data.valid, "click": union(sim_data.valid["click"], test_pair)})
    problems = leak_violations(both)
    assert f"{test_pair.nnz} click pairs are in both valid and test" in problems
    # Validation pairs must be removed from train by the tuning view; without the fold they leak.
    no_fold = dataclasses.replace(sim_data, valid_holdout=None)
    problems = leak_violations(no_fold)
    assert f"{sim_data.valid['click'].nnz} click valid pairs are in click train" in problems


def test_cold_test_users_are_counted():
    n_users, n_items = 3, 4

    def csr(pairs):
        return pairs_to_csr(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]), n_users, n_items)

    # User 2 has test pairs in both stages and no training history at all: one cold user per stage.
    data = CascadeData(
        name="cold",
        stages=("click", "buy"),
        n_users=n_users,
        n_items=n_items,
        train={"click": csr([(0, 0), (1, 1)]), "buy": csr([(0, 0)])},
        valid={"click": csr([(0, 0)]), "buy": csr([(0, 0)])},
        test={"click": csr([(0, 2), (2, 3)]), "buy": csr([(1, 1), (2, 3)])},
        exclude={"click": ("click", "buy"), "buy": ("buy",)},
    )
    report = LoadReport("cold")
    finish_report(data, report)
    assert report.cold_test_users == {"click": 1, "buy": 1}
    assert report.stage_positives == {"click": 4, "buy": 3}
    # buy = {(0,0), (1,1), (2,3)}; all three are click pairs (train or test).
    assert report.subset_rate == {"buy": 1.0}


def test_ranking_exclusions(jd_files, sim_data):
    # Generic logs: every logged train pair of any stage is skipped when ranking any stage.
    every = union(*sim_data.train.values())
    for s in sim_data.stages:
        assert sim_data.exclude[s] == sim_data.stages
        assert same(sim_data.excluded(s), every)
    # JD: click ranking skips every train behaviour (favorites included); purchases skip only purchases.
    data = split_jd(jd_files)
    assert same(data.excluded("view"), union(data.train["view"], jd_files["trn_buy"], jd_files["trn_fav"]))
    assert same(data.excluded("purchase"), jd_files["trn_buy"])
