"""The simulator writes a log that the generic loader reads back exactly, deterministically per seed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from csmf.config import SimConfig
from csmf.data.logtable import load_log
from csmf.data.simulate import (
    PARTS,
    SIM_STAGES,
    item_world,
    next_period_world,
    simulate,
    simulate_next_period,
    user_factors,
)

# chunk_users=128 makes three chunks (128 + 128 + 44 users), i.e. three row groups / CSV batches.
CFG = SimConfig(n_users=300, n_items=200, chunk_users=128)


def by_id(ids: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Reorder per-index values so that position k holds the value of original id k."""
    out = np.full(n, -1, dtype=values.dtype)
    out[ids.astype(np.int64)] = values
    return out


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_round_trip_counts_and_cascade(tmp_path, suffix):
    path = tmp_path / f"sim{suffix}"
    counts = simulate(CFG, path, progress=False)
    assert set(counts) == {"rows", *SIM_STAGES}
    assert counts["rows"] == counts["exposure"] > counts["click"] > counts["conversion"] > 0

    log = load_log(path)
    assert log.stages == SIM_STAGES == ("exposure", "click", "conversion")
    assert log.report.rows_read == counts["rows"]
    assert log.report.duplicate_pairs == 0  # candidates are deduplicated per user
    assert log.report.skipped == {}
    assert log.labels.sum(axis=0).tolist() == [counts[s] for s in SIM_STAGES]
    assert len(log.users) == counts["rows"]
    exposure, click, conversion = log.labels.T
    assert exposure.all()
    assert not (click & ~exposure).any()
    assert not (conversion & ~click).any()
    assert log.n_users == CFG.n_users  # every user has at least one exposure, across all chunks
    assert log.n_items <= CFG.n_items
    assert sorted(log.user_ids.tolist()) == list(range(CFG.n_users))
    assert log.timestamps is not None
    assert set(log.user_features) == {"user_segment"}
    assert set(log.item_features) == {"item_category"}

    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == sorted([path.name, path.name + ".truth.npz"])


def test_parquet_and_csv_hold_the_same_log(tmp_path):
    counts_a = simulate(CFG, tmp_path / "a.parquet", progress=False)
    counts_b = simulate(CFG, tmp_path / "b.csv", progress=False)
    assert counts_a == counts_b
    a, b = load_log(tmp_path / "a.parquet"), load_log(tmp_path / "b.csv")
    for field in ("users", "items", "labels", "timestamps", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(a.user_features["user_segment"], b.user_features["user_segment"])


def test_same_seed_same_content_other_seed_differs(tmp_path):
    simulate(CFG, tmp_path / "a.parquet", progress=False)
    simulate(CFG, tmp_path / "b.parquet", progress=False)
    simulate(dataclasses.replace(CFG, seed=1), tmp_path / "c.parquet", progress=False)
    a, b, c = (pq.read_table(tmp_path / f"{n}.parquet") for n in "abc")
    assert a.equals(b)
    assert not a.equals(c)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()

    simulate(CFG, tmp_path / "a.csv", progress=False)
    simulate(CFG, tmp_path / "b.csv", progress=False)
    simulate(dataclasses.replace(CFG, seed=1), tmp_path / "c.csv", progress=False)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()


def test_truth_file_and_item_world(tmp_path):
    path = tmp_path / "sim.parquet"
    simulate(CFG, path, progress=False)
    truth = np.load(tmp_path / "sim.parquet.truth.npz")
    world = item_world(CFG)
    assert truth["item_factors"].shape == (CFG.n_items, len(PARTS), CFG.dim)
    np.testing.assert_array_equal(truth["item_factors"], world.factors)
    np.testing.assert_array_equal(truth["popularity"], world.popularity)
    assert truth["popularity"].sum() == pytest.approx(1.0)
    # The logged item category is the one the item world defines.
    log = load_log(path)
    category = by_id(log.item_ids, log.item_features["item_category"].astype(np.int64), CFG.n_items)
    seen = category >= 0
    np.testing.assert_array_equal(category[seen], world.category[seen])


def test_user_factors_regenerate_the_logged_users(tmp_path):
    path = tmp_path / "sim.parquet"
    simulate(CFG, path, progress=False)
    log = load_log(path)
    n_chunks = -(-CFG.n_users // CFG.chunk_users)
    parts = [user_factors(CFG, c) for c in range(n_chunks)]
    again = [user_factors(CFG, c) for c in range(n_chunks)]
    for (f1, n1), (f2, n2) in zip(parts, again, strict=True):
        np.testing.assert_array_equal(f1, f2)
        np.testing.assert_array_equal(n1, n2)
    assert [len(n) for _, n in parts] == [128, 128, 44]
    assert not np.array_equal(parts[0][0][:44], parts[2][0])  # chunks draw different users
    factors = np.concatenate([f for f, _ in parts])
    planned = np.concatenate([n for _, n in parts])
    assert factors.shape == (CFG.n_users, len(PARTS), CFG.dim)

    # The logged user segment is argmax of the regenerated shared factors' first 4 dims.
    segment = by_id(log.user_ids, log.user_features["user_segment"].astype(np.int64), CFG.n_users)
    np.testing.assert_array_equal(segment, np.argmax(factors[:, 0, :4], axis=1))
    # Each user sees at most its planned number of exposures (fewer only when candidates run out).
    rows = by_id(log.user_ids, np.bincount(log.users, minlength=log.n_users), CFG.n_users)
    assert (rows <= planned).all()
    assert (rows == planned).mean() > 0.9
    assert rows.sum() == len(log.users)

    other = user_factors(dataclasses.replace(CFG, seed=1), 0)[0]
    assert not np.array_equal(other, parts[0][0])


def test_simulate_rejects_other_suffixes(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.parquet or \.csv"):
        simulate(CFG, tmp_path / "sim.json", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_second_period_continues_the_world_with_new_users_and_items_after_the_first_ids(tmp_path):
    cfg = dataclasses.replace(CFG, item_features=2)
    simulate(cfg, tmp_path / "p1.parquet", progress=False)
    first = pq.read_table(tmp_path / "p1.parquet").to_pandas()
    counts = simulate_next_period(cfg, tmp_path / "p2.parquet", 50, 40, progress=False)
    second = pq.read_table(tmp_path / "p2.parquet").to_pandas()
    assert counts["rows"] == len(second) and counts["exposure"] > counts["click"] > counts["conversion"] > 0
    assert list(second.columns) == list(first.columns)
    assert set(second.user_id) == set(range(cfg.n_users + 50))  # every first-period user again, then the new ones
    assert second.item_id.max() >= cfg.n_items and second.item_id.max() < cfg.n_items + 40
    assert (second.item_id >= cfg.n_items).mean() > 0.05  # the new items are exposed
    assert second.timestamp.min() > first.timestamp.max()  # later: a time split separates the periods
    # an item of both periods keeps its category and feature codes, a user its segment
    for key, columns in (("item_id", ["item_category", "item_f0", "item_f1"]), ("user_id", ["user_segment"])):
        both = first.drop_duplicates(key).merge(second.drop_duplicates(key), on=key)
        assert len(both) and all((both[f"{c}_x"] == both[f"{c}_y"]).all() for c in columns)
    # the same world: the first items' factors and relative popularity, the new items appended
    world, later = item_world(cfg), next_period_world(cfg, 40)
    np.testing.assert_array_equal(later.factors[: cfg.n_items], world.factors)
    np.testing.assert_allclose(later.popularity[: cfg.n_items] / later.popularity[: cfg.n_items].sum(),
                               world.popularity)  # fmt: skip
    truth = np.load(tmp_path / "p2.parquet.truth.npz")
    assert truth["item_factors"].shape == (cfg.n_items + 40, len(PARTS), cfg.dim)
    # the second period draws afresh: another log than the first period's for the same users
    before, after = (log[log.user_id < 5].item_id.to_numpy() for log in (first, second))
    assert not np.array_equal(before, after)
