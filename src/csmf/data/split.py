"""Train / valid / test splits, each fixed by a seed, all obeying one leak rule.

Leak rule: no test pair of a stage appears in the training data of that stage or of any later stage
(a later-stage positive reveals the earlier event). Earlier-stage evidence for a later-stage test pair
is legitimate and stays (a test purchase that was viewed in training). `schema.leak_violations`
checks it; tests run it on every split.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp

import csmf.data.context as context
from csmf.config import ConfigError
from csmf.data.errors import DataError
from csmf.data.histories import recency_ranks
from csmf.data.schema import (
    CascadeData,
    CascadeLog,
    LoadReport,
    binary,
    count_users,
    difference,
    intersection,
    pairs_to_csr,
    subset_rates,
    union,
)


def holdout_order(n_per_user: np.ndarray, frac: float, keys: np.ndarray) -> np.ndarray:
    """Boolean mask over pairs grouped by user: the `frac` of each user's pairs with the smallest keys.

    Pairs must be grouped by user in the order `n_per_user` describes. A user with fewer than two
    pairs keeps them all; otherwise at least one pair is held out and at least one is kept.
    """
    starts = np.repeat(np.cumsum(n_per_user) - n_per_user, n_per_user)
    owner = np.repeat(np.arange(len(n_per_user)), n_per_user)
    order = np.lexsort((keys, owner))  # by user, then by key
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - starts[order]
    n_hold = np.where(n_per_user >= 2, np.clip(np.rint(frac * n_per_user), 1, n_per_user - 1), 0)
    return rank < np.repeat(n_hold, n_per_user)


def per_user_holdout(
    mat: sp.csr_matrix, frac: float, seed: int, protected: sp.csr_matrix | None = None
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Hold out a random `frac` of each user's pairs: returns (kept, held).

    Held pairs that are in `protected` (e.g. later-stage train pairs) go back to `kept`, so the
    held-out side never contains a pair that a later stage trains on.
    """
    mat = binary(mat)
    mat.sort_indices()
    n_per_user = np.diff(mat.indptr).astype(np.int64)
    keys = np.random.default_rng(seed).random(mat.nnz)
    held_mask = holdout_order(n_per_user, frac, keys)
    users = np.repeat(np.arange(mat.shape[0], dtype=np.int32), n_per_user)
    held = pairs_to_csr(users[held_mask], mat.indices[held_mask], *mat.shape)
    if protected is not None:
        held = difference(held, protected)
    return difference(mat, held), held


JD_BEHAVIOURS = ("view", "favorite", "purchase")
JD_STAGES = ("interact",) + JD_BEHAVIOURS  # "interact" = any train interaction (view | favorite | purchase)
JD_DEFAULT_STAGES = ("view", "purchase")


def split_jd(
    files: dict[str, sp.csr_matrix],
    stages: tuple[str, ...] = JD_DEFAULT_STAGES,
    test_frac: float = 0.2,
    valid_frac: float = 0.1,
    seed: int = 0,
    report: LoadReport | None = None,
) -> CascadeData:
    """The JD protocol.

    - purchase: train trn_buy, validate vld_buy, test tst_buy (the published files).
    - view (click): a random `test_frac` of each user's trn_pv pairs (seed 0 by protocol; users with
      fewer than 2 views keep all) is the click test; held pairs that are also in trn_buy or trn_fav go
      back to the click train (a purchase reveals the view). The rest is the click train.
    - favorite, when it is a stage: the same hold-out on trn_fav, protected against trn_buy.
    - interact: train = view | favorite | purchase train; test = the view (and favorite) tests.
    - Tuning folds: `valid_frac` of each user's remaining view (favorite) train pairs, protected the
      same way, are the validation pairs of those stages; they stay in `train` for the final fit and
      `tuning_view()` removes them.
    Ranking for the click test excludes the user's training items of every behaviour; ranking for
    purchases excludes only training purchases (the published protocol).
    """
    unknown = [s for s in stages if s not in JD_STAGES]
    if unknown or not stages:
        raise ConfigError(f"data.stages: JD stages are chosen from {JD_STAGES}; got {stages}")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"data.stages: JD stages repeat a name: {stages}")
    order = [s for s in JD_STAGES if s in stages]
    if list(stages) != order:
        raise ConfigError(f"data.stages: JD stages must follow the cascade order {JD_STAGES}; got {stages}")
    report = report or LoadReport("jd")
    n_users, n_items = files["trn_buy"].shape
    buy, fav, pv = files["trn_buy"], files["trn_fav"], files["trn_pv"]

    train = {"purchase": buy}
    valid: dict[str, sp.csr_matrix] = {"purchase": files["vld_buy"]}
    test = {"purchase": files["tst_buy"]}
    tuning_fold = []

    # The favorite hold-out exists only when favorite is a stage; otherwise trn_fav is side data.
    fav_is_stage = "favorite" in stages
    if fav_is_stage:
        fav_train, fav_test = per_user_holdout(fav, test_frac, seed + 1, protected=buy)
        _, fav_valid = per_user_holdout(fav_train, valid_frac, seed + 3, protected=buy)
        train["favorite"], valid["favorite"], test["favorite"] = fav_train, fav_valid, fav_test
        tuning_fold.append(fav_valid)
    else:
        fav_train = fav

    later_than_view = union(buy, fav_train)
    view_train, view_test = per_user_holdout(pv, test_frac, seed, protected=later_than_view)
    _, view_valid = per_user_holdout(view_train, valid_frac, seed + 2, protected=later_than_view)
    train["view"], valid["view"], test["view"] = view_train, view_valid, view_test
    tuning_fold.append(view_valid)

    # An interaction test pair must be absent from every train behaviour (a favorite test pair that
    # was viewed in training is not one), and never also a validation pair.
    train["interact"] = union(train["view"], fav_train, buy)
    test["interact"] = union(view_test, test["favorite"]) if fav_is_stage else view_test
    test["interact"] = difference(test["interact"], train["interact"])
    valid["interact"] = difference(union(*tuning_fold), test["interact"])

    behaviours = ["view", "favorite", "purchase"]
    # A behaviour outside the cascade has no test pairs of its own, so it is side data in full,
    # except views: while any stage needs the click hold-out, held-out views stay out of training.
    needs_view_test = any(s in stages for s in ("view", "interact"))
    full = {"view": train["view"] if needs_view_test else pv, "favorite": fav_train, "purchase": buy}
    side = {b: full[b] for b in behaviours if b not in stages}
    every = tuple(stages) + tuple(side)
    downstream = {
        "interact": every,
        "view": every,  # every behaviour reveals a view
        "favorite": tuple(n for n in every if n in ("favorite", "purchase")),
        "purchase": ("purchase",),
    }
    exclude = {"interact": every, "view": every, "favorite": every, "purchase": ("purchase",)}
    data = CascadeData(
        # Results of another cascade must not overwrite the default one's: the name carries the stages.
        name="jd" if tuple(stages) == JD_DEFAULT_STAGES else "jd-" + "-".join(stages),
        stages=tuple(stages),
        n_users=n_users,
        n_items=n_items,
        train={s: train[s] for s in stages},
        valid={s: valid[s] for s in stages},
        test={s: test[s] for s in stages},
        exclude={s: exclude[s] for s in stages},
        side=side,
        downstream={s: downstream[s] for s in stages},
        valid_holdout=union(*tuning_fold),
        user_ids=np.arange(1, n_users + 1),
        item_ids=np.arange(1, n_items + 1),
        report=report,
    )
    finish_report(data, report)
    report.notes.append(
        f"click test: {test_frac:.0%} of each user's trn_pv pairs (seed {seed}); "
        f"{intersection(pv, later_than_view).nnz:,} trn_pv pairs that are also purchases or favorites "
        "can never be click-test pairs"
    )
    return data


def split_log(
    log: CascadeLog,
    test_frac: float = 0.2,
    valid_frac: float = 0.1,
    seed: int = 0,
    by: str = "random",
    name: str = "log",
) -> CascadeData:
    """Per-user hold-out of rows for a generic log (or the simulator).

    A held-out row goes to the test side for every stage, so the leak rule holds by construction.
    `by="random"`: a seeded random `test_frac` of each user's rows; `by="time"`: each user's latest rows
    (needs timestamps; ties broken at random). A tuning fold of `valid_frac` of each user's remaining
    rows is drawn the same way and removed from train by `tuning_view()`.
    """
    if by not in ("random", "time"):
        raise ConfigError(f"data.split must be 'random' or 'time', got {by!r}")
    if by == "time" and log.timestamps is None:
        raise DataError(f"{name}: data.split='time' needs a timestamp column; this log has none")
    order = np.lexsort((log.items, log.users))
    users, items, labels = log.users[order], log.items[order], log.labels[order]
    n_per_user = np.bincount(users, minlength=log.n_users).astype(np.int64)
    rng = np.random.default_rng(seed)
    noise = rng.random(len(users))
    # Smaller key = held out first: random keys, or latest first with random ties. Ranks, not raw
    # times, carry the tie-break: noise added to Unix seconds would vanish below float precision.
    if by == "random":
        keys = noise
    else:
        time_rank = np.unique(log.timestamps[order], return_inverse=True)[1]
        keys = -time_rank + 0.5 * noise
    test_mask = holdout_order(n_per_user, test_frac, keys)
    rest = ~test_mask
    rest_counts = np.bincount(users[rest], minlength=log.n_users).astype(np.int64)
    rest_keys = rng.random(int(rest.sum())) if by == "random" else keys[rest]
    valid_mask = np.zeros(len(users), dtype=bool)
    valid_mask[np.flatnonzero(rest)] = holdout_order(rest_counts, valid_frac, rest_keys)

    def mats(mask: np.ndarray) -> dict[str, sp.csr_matrix]:
        return {
            s: pairs_to_csr(users[mask & labels[:, k]], items[mask & labels[:, k]], log.n_users, log.n_items)
            for k, s in enumerate(log.stages)
        }

    train, valid, test = mats(rest), mats(valid_mask), mats(test_mask)
    data = CascadeData(
        name=name,
        stages=log.stages,
        n_users=log.n_users,
        n_items=log.n_items,
        train=train,
        valid=valid,
        test=test,
        # Held-out rows are unseen pairs for every stage, so no test positive is ever a train pair of
        # any stage; ranking skips every logged train pair (a logged, unclicked exposure is not new).
        exclude={s: log.stages for s in log.stages},
        valid_holdout=pairs_to_csr(users[valid_mask], items[valid_mask], log.n_users, log.n_items),
        user_ids=log.user_ids,
        item_ids=log.item_ids,
        user_features=log.user_features,
        item_features=log.item_features,
        report=log.report,
        context=context.matrices(log.context, log.users, log.items, log.n_users, log.n_items),
        # a held-out row leaves the training side whole, so a training pair's time is training data
        recency=None if log.timestamps is None else recency_ranks(
            users[rest], items[rest], log.timestamps[order][rest], log.n_users, log.n_items
        ),
    )  # fmt: skip
    finish_report(data, log.report)
    return data


def finish_report(data: CascadeData, report: LoadReport) -> None:
    full = {s: union(data.train[s], data.test[s]) for s in data.stages}
    report.stage_positives = {s: m.nnz for s, m in full.items()}
    report.subset_rate = subset_rates(data.stages, full)
    history = union(*(data.matrix(b) for b in data.behaviours))
    has_history = np.diff(history.indptr) > 0
    for s in data.stages:
        test_users = np.diff(data.test[s].indptr) > 0
        report.cold_test_users[s] = int((test_users & ~has_history).sum())
        if count_users(data.test[s]) == 0:
            report.notes.append(f"stage {s} has no test pairs after the split; it will not be evaluated")


def cold_item_view(data: CascadeData, max_train_pairs: int) -> tuple[CascadeData, int]:
    """The same cascade with each stage's test pairs cut to the items that have at most `max_train_pairs`
    training pairs (every stage and side behaviour together), ranked among those items only: where an item's
    ID embedding has little to learn from and its features must carry it (the full catalogue would rank the
    popular items first for every model). Returns (the view, how many items qualify)."""
    degree = np.zeros(data.n_items, dtype=np.int64)
    for name in data.behaviours:
        degree += np.bincount(data.matrix(name).indices, minlength=data.n_items)
    cold = degree <= max_train_pairs
    keep = sp.diags(cold.astype(np.float32))
    test = {s: binary(m @ keep) for s, m in data.test.items()}
    view = replace(data, name=f"{data.name}:cold-items", test=test, candidates=cold)
    return view, int(cold.sum())
