"""Cascade simulator: exposure -> click -> conversion logs with known ground truth, streamed to disk.

Users and items carry latent factors in four parts: shared, exposure-, click- and conversion-specific.
A logging policy (popularity candidates ranked by a noisy exposure affinity) picks each user's
exposures; a click happens with probability sigmoid(shared + click-specific affinity + bias) and a
conversion, given a click, with sigmoid(shared + conversion-specific affinity + bias). Click and
conversion therefore agree only partly, as in real logs. Users are generated chunk by chunk from
per-chunk seeds, so memory stays bounded and any user's factors can be regenerated (`user_factors`).

A second period (`simulate_next_period`) continues the same latent world 30 days later: every user of the first
period comes back with fresh draws, new users and new items are appended after the first period's ids, and the
first period's items keep their factors, popularity, category and feature codes (what a refresh on new data,
csmf.refresh, is measured on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from csmf.config import ConfigError, SimConfig
from csmf.progress import bar

SIM_STAGES = ("exposure", "click", "conversion")
PARTS = ("shared", "exposure", "click", "conversion")


@dataclass
class ItemWorld:
    factors: np.ndarray  # (n_items, 4, dim) float32, parts in PARTS order
    popularity: np.ndarray  # (n_items,) float64, sums to 1
    category: np.ndarray  # (n_items,) int32
    features: np.ndarray  # (n_items, sim.item_features) int32 codes that carry part of the factors
    scenarios: np.ndarray  # (sim.scenarios, 4, dim) float32: what each scenario adds to every user's factors


def _informative_features(cfg: SimConfig, factors: np.ndarray, added: np.ndarray | None = None) -> np.ndarray:
    """Codes of random projections of each item's factors, cut into `sim.feature_buckets` equal-mass buckets:
    features that tell part of what the item is (its own stream of draws: the log stays as it was). `added`: the
    factors of a later period's new items, coded with the buckets of `factors` and returned after them (the
    first items keep their codes)."""
    rng = np.random.default_rng([cfg.seed, 3])
    flat = factors.reshape(len(factors), -1)
    extra = None if added is None else added.reshape(len(added), -1)
    out = np.zeros((len(factors) + (0 if added is None else len(added)), cfg.item_features), dtype=np.int32)
    for k in range(cfg.item_features):
        direction = rng.standard_normal(flat.shape[1]).astype(np.float32)
        projection = flat @ direction
        edges = np.quantile(projection, np.linspace(0, 1, cfg.feature_buckets + 1)[1:-1])
        if extra is not None:  # projected apart: the first items' products are the ones the first period made
            projection = np.concatenate([projection, extra @ direction])
        out[:, k] = np.searchsorted(edges, projection)
    return out


def item_world(cfg: SimConfig) -> ItemWorld:
    rng = np.random.default_rng([cfg.seed, 0])
    factors = rng.standard_normal((cfg.n_items, len(PARTS), cfg.dim), dtype=np.float32)
    ranks = rng.permutation(cfg.n_items) + 1
    popularity = 1.0 / ranks.astype(np.float64) ** cfg.popularity_skew
    popularity /= popularity.sum()
    category = np.argmax(factors[:, 0, :8], axis=1).astype(np.int32)
    # own stream of draws, so a log without scenarios is the log it was before they existed
    scenarios = np.random.default_rng([cfg.seed, 5]).standard_normal((cfg.scenarios, len(PARTS), cfg.dim))
    scenarios = (scenarios * cfg.scenario_strength).astype(np.float32)
    return ItemWorld(factors, popularity, category, _informative_features(cfg, factors), scenarios)


def user_factors(cfg: SimConfig, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(factors (B, 4, dim), activity (B,)) of the users in chunk `chunk`, regenerated exactly."""
    rng = np.random.default_rng([cfg.seed, 1, chunk])
    return _draw_users(cfg, rng, min(cfg.chunk_users, cfg.n_users - chunk * cfg.chunk_users))


def _draw_users(cfg: SimConfig, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(factors (n, 4, dim), exposure counts (n,)) of `n` users drawn from `rng`."""
    factors = rng.standard_normal((n, len(PARTS), cfg.dim), dtype=np.float32)
    # Log-normal activity with the configured mean: a few heavy users, many light ones.
    activity = rng.lognormal(mean=0.0, sigma=0.6, size=n)
    counts = np.maximum(1, np.rint(activity / activity.mean() * cfg.exposures_per_user)).astype(np.int64)
    return factors, counts


def _affinity(
    user_f: np.ndarray, item_f: np.ndarray, users: np.ndarray, items: np.ndarray, part: int, dim: int
) -> np.ndarray:
    """<user part, item part> / sqrt(dim) for each (user, item) pair; gathers one part at a time."""
    return np.einsum("nd,nd->n", user_f[users, part], item_f[items, part]) / np.sqrt(dim)


def _row_affinity(user_f: np.ndarray, world: ItemWorld, scenario: np.ndarray | None, users: np.ndarray,
                  items: np.ndarray, part: int, dim: int) -> np.ndarray:  # fmt: skip
    """`_affinity` of each row, plus <scenario vector, item part> when rows have scenarios: the user's
    factors shifted by the row's scenario (linear, so the two inner products add)."""
    out = _affinity(user_f, world.factors, users, items, part, dim)
    if scenario is not None:
        out = out + _affinity(world.scenarios, world.factors, scenario, items, part, dim)
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def simulate_chunks(cfg: SimConfig) -> Iterator[pa.Table]:
    """Yield the log as Arrow tables, one per chunk of users."""
    world = item_world(cfg)
    cdf = np.cumsum(world.popularity)
    n_chunks = -(-cfg.n_users // cfg.chunk_users)
    for chunk in range(n_chunks):
        rng = np.random.default_rng([cfg.seed, 2, chunk])
        factors, counts = user_factors(cfg, chunk)
        yield _chunk_log(cfg, world, cdf, factors, counts, rng, [cfg.seed, 4, chunk], chunk * cfg.chunk_users, START)


START = 1_700_000_000  # the first period's first second; each period spans PERIOD seconds
PERIOD = 30 * 86_400


def _chunk_log(cfg: SimConfig, world: ItemWorld, cdf: np.ndarray, factors: np.ndarray, counts: np.ndarray,
               rng: np.random.Generator, scenario_seed: list[int], first_user: int,
               start: int) -> pa.Table:  # fmt: skip
    """The log rows of one chunk of users (factors, exposure counts) over `world`'s items, drawn from `rng` (the
    scenarios from `scenario_seed`), user ids from `first_user`, timestamps in [start, start + PERIOD)."""
    n_items = len(world.popularity)
    w = cfg.shared_weight
    # Candidates: popularity draws, several per exposure slot, deduplicated per user.
    cand_user = np.repeat(np.arange(len(counts)), counts * cfg.candidates_per_exposure)
    cand_item = np.minimum(np.searchsorted(cdf, rng.random(len(cand_user))), n_items - 1)
    key = np.sort(cand_user.astype(np.int64) * n_items + cand_item)
    key = key[np.r_[True, key[1:] != key[:-1]]]  # sort + diff: numpy's hash-based unique is slower here
    cand_user, cand_item = (key // n_items).astype(np.int64), (key % n_items).astype(np.int64)
    # each candidate comes up in one scenario, whose vector adds to the user's (sim.scenarios > 0)
    scenario = None
    if cfg.scenarios:
        scenario = np.random.default_rng(scenario_seed).integers(0, cfg.scenarios, len(cand_user))
    true_exposure = w * _row_affinity(factors, world, scenario, cand_user, cand_item, 0, cfg.dim)
    true_exposure += (1 - w) * _row_affinity(factors, world, scenario, cand_user, cand_item, 1, cfg.dim)
    policy = true_exposure + cfg.policy_noise * rng.standard_normal(len(cand_user))
    # Each user sees the top `count` candidates of the policy score.
    order = np.lexsort((-policy, cand_user))
    starts = np.searchsorted(cand_user[order], np.arange(len(counts)))
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    chosen = order[rank < counts[cand_user[order]]]
    cu, ci = cand_user[chosen], cand_item[chosen]
    seen_in = None if scenario is None else scenario[chosen]
    shared = _row_affinity(factors, world, seen_in, cu, ci, 0, cfg.dim)
    click_own = _row_affinity(factors, world, seen_in, cu, ci, 2, cfg.dim)
    conv_own = _row_affinity(factors, world, seen_in, cu, ci, 3, cfg.dim)
    p_click = _sigmoid(w * shared + (1 - w) * click_own * 2 + cfg.click_bias)
    p_conv = _sigmoid(w * shared + (1 - w) * conv_own * 2 + cfg.conversion_bias)
    click = rng.random(len(chosen)) < p_click
    conversion = click & (rng.random(len(chosen)) < p_conv)
    users = cand_user[chosen]
    timestamps = start + rng.integers(0, PERIOD, size=len(chosen))
    segment = np.argmax(factors[:, 0, :4], axis=1).astype(np.int32)
    return pa.table(
        {
            "user_id": (users + first_user).astype(np.int64),
            "item_id": cand_item[chosen].astype(np.int64),
            "exposure": np.ones(len(chosen), dtype=np.int8),
            "click": click.astype(np.int8),
            "conversion": conversion.astype(np.int8),
            "timestamp": timestamps.astype(np.int64),
            "user_segment": segment[users],
            "item_category": world.category[cand_item[chosen]],
            **{f"item_f{k}": world.features[cand_item[chosen], k] for k in range(cfg.item_features)},
            **({"scenario": seen_in.astype(np.int32)} if seen_in is not None else {}),
        }
    )


def next_period_world(cfg: SimConfig, new_items: int) -> ItemWorld:
    """The first period's world with `new_items` items appended (ids n_items, n_items + 1, ...): the first items
    keep their factors, category and feature codes, and their popularity relative to each other; each new item is
    as popular as a first-period item of a random rank (its own stream of draws)."""
    first = item_world(cfg)
    rng = np.random.default_rng([cfg.seed, 6])
    added = rng.standard_normal((new_items, len(PARTS), cfg.dim), dtype=np.float32)
    ranks = rng.integers(1, cfg.n_items + 1, size=new_items)
    head = 1.0 / np.arange(1, cfg.n_items + 1, dtype=np.float64) ** cfg.popularity_skew  # first-period weights
    added_popularity = (1.0 / ranks.astype(np.float64) ** cfg.popularity_skew) / head.sum()
    popularity = np.concatenate([first.popularity, added_popularity])
    category = np.concatenate([first.category, np.argmax(added[:, 0, :8], axis=1).astype(np.int32)])
    features = _informative_features(cfg, first.factors, added)
    factors = np.concatenate([first.factors, added])
    return ItemWorld(factors, popularity / popularity.sum(), category, features, first.scenarios)


def next_period_chunks(cfg: SimConfig, new_users: int, new_items: int) -> Iterator[pa.Table]:
    """The second period's log, chunk by chunk: every first-period user again (the same factors and activity,
    fresh draws), then `new_users` new users (ids n_users, n_users + 1, ...), over next_period_world's items,
    timestamps in the 30 days after the first period's."""
    world = next_period_world(cfg, new_items)
    cdf = np.cumsum(world.popularity)
    start = START + PERIOD
    for chunk in range(-(-cfg.n_users // cfg.chunk_users)):
        factors, counts = user_factors(cfg, chunk)
        rng = np.random.default_rng([cfg.seed, 8, chunk])
        yield _chunk_log(cfg, world, cdf, factors, counts, rng, [cfg.seed, 9, chunk], chunk * cfg.chunk_users, start)
    for chunk in range(-(-new_users // cfg.chunk_users)):
        n = min(cfg.chunk_users, new_users - chunk * cfg.chunk_users)
        factors, counts = _draw_users(cfg, np.random.default_rng([cfg.seed, 7, chunk]), n)
        rng = np.random.default_rng([cfg.seed, 10, chunk])
        first_user = cfg.n_users + chunk * cfg.chunk_users
        yield _chunk_log(cfg, world, cdf, factors, counts, rng, [cfg.seed, 11, chunk], first_user, start)


def simulate(cfg: SimConfig, out: str | Path, progress: bool = True) -> dict:
    """Stream the simulated log to `out` (.parquet or .csv); return row and stage counts.

    Also writes `<out>.truth.npz` with the item factors and popularity (user factors are regenerated
    by `user_factors`, so they are not stored).
    """
    n_chunks = -(-cfg.n_users // cfg.chunk_users)
    return _write_log(simulate_chunks(cfg), n_chunks, Path(out), lambda: item_world(cfg), progress)


def simulate_next_period(cfg: SimConfig, out: str | Path, new_users: int, new_items: int,
                         progress: bool = True) -> dict:  # fmt: skip
    """Stream the second period of `cfg`'s world to `out` (next_period_chunks): `simulate` with the same `cfg` wrote
    the first. Its truth file holds every item of the second period's world, the new ones last."""
    if new_users < 0 or new_items < 0:
        raise ConfigError(f"--new-users {new_users} / --new-items {new_items}: give counts >= 0")
    n_chunks = -(-cfg.n_users // cfg.chunk_users) + -(-new_users // cfg.chunk_users)
    chunks = next_period_chunks(cfg, new_users, new_items)
    return _write_log(chunks, n_chunks, Path(out), lambda: next_period_world(cfg, new_items), progress)


def _write_log(chunks: Iterator[pa.Table], n_chunks: int, out: Path, world: Callable[[], ItemWorld],
               progress: bool) -> dict:  # fmt: skip
    """Write the chunks to `out` (.parquet or .csv, atomically) and `world()`'s truth beside it; the counts."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix not in (".parquet", ".csv"):
        raise ConfigError(f"--out {out}: simulator output must end in .parquet or .csv")
    tmp = out.with_name(out.name + ".partial")
    counts = {"rows": 0, **{s: 0 for s in SIM_STAGES}}
    writer = None
    try:
        for table in bar(chunks, progress, total=n_chunks, desc="simulate", unit="chunk"):
            if writer is None:
                writer = (
                    pq.ParquetWriter(tmp, table.schema)
                    if out.suffix == ".parquet"
                    else pacsv.CSVWriter(tmp, table.schema)
                )
            writer.write_table(table)
            counts["rows"] += table.num_rows
            for s in SIM_STAGES:
                counts[s] += int(np.asarray(table.column(s)).sum())
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(out)  # only a complete log ever carries the final name
    truth = world()
    np.savez_compressed(out.with_name(out.name + ".truth.npz"), item_factors=truth.factors, popularity=truth.popularity)
    return counts


def simulate_layout(cfg: SimConfig, layout: str, folder: str | Path, progress: bool = True) -> dict:
    """Stream the simulated log into `folder` in a public dataset's layout (csmf.data.layouts)."""
    from csmf.data.layouts import write_layout

    counts = {"rows": 0}
    n_chunks = -(-cfg.n_users // cfg.chunk_users)

    def count(table: pa.Table) -> None:
        counts["rows"] += table.num_rows

    chunks = bar(simulate_chunks(cfg), progress, total=n_chunks, desc=f"simulate {layout}", unit="chunk")
    counts["files"] = write_layout(chunks, layout, Path(folder), cfg.seed, on_chunk=count)
    return counts
