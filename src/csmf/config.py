"""The one typed configuration object that flows through csmf, and its TOML form.

Every default lives here. CLI flags and `--config file.toml` map onto these dataclasses; unknown
keys are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import tomli_w


def per_stage(values: tuple, stage: int):
    """The value for 1-based `stage` from a per-stage tuple whose last value repeats (train.lr, cascade.tau, ...)."""
    return values[min(stage, len(values)) - 1]


def _positive(v) -> bool:
    return all(x > 0 for x in (v if isinstance(v, tuple) else (v,)))


def _at_least(low):
    return lambda v: all(x >= low for x in (v if isinstance(v, tuple) else (v,)))


def _in(low, high, closed_high=False):
    return lambda v: all(low <= x < high or (closed_high and x == high) for x in (v if isinstance(v, tuple) else (v,)))


def _nonempty(v) -> bool:
    return len(v) > 0


METRIC = re.compile(r"(recall|ndcg)@([1-9][0-9]*)")


class Checked:
    """Checks every field when a section is built (so `--set` and TOML typos fail before any work starts):
    Literal fields against their choices, the rest against the section's RULES (field -> (test, words))."""

    SECTION: ClassVar[str] = ""
    RULES: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {}
    if typing.TYPE_CHECKING:  # every section is a dataclass; declared for the type checker only, so the runtime
        # type hints (what `--set` accepts) stay the section's fields
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, key = getattr(self, f.name), f"{self.SECTION}.{f.name}" if self.SECTION else f.name
            _check_choice(value, hints[f.name], key)
            rule = self.RULES.get(f.name)
            if rule is not None and value is not None and not rule[0](value):
                raise ConfigError(f"{key}: must be {rule[1]}, got {_shown(value)}")


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def _check_choice(value: Any, annotation: Any, key: str) -> None:
    """A Literal field (or a tuple of them) holds one of its choices."""
    if typing.get_origin(annotation) is tuple:
        for v in value:
            _check_choice(v, typing.get_args(annotation)[0], key)
    elif typing.get_origin(annotation) is Literal and value not in typing.get_args(annotation):
        raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(annotation))}")


@dataclass(frozen=True)
class DataConfig(Checked):
    SECTION: ClassVar[str] = "data"
    RULES: ClassVar[dict] = {
        "stages": (lambda v: len(set(v)) == len(v), "stage names without repeats"),
        "test_frac": (lambda v: 0.0 < v < 1.0, "in (0, 1)"),
        "valid_frac": (_in(0.0, 1.0), "in [0, 1)"),
        "test_users": (_at_least(0), ">= 0 (0 = every held-out user)"),
    }

    # "jd", "sim", "kuairand" / "aliccp" / "aliexpress" / "tenrec" (files in data_dir), or a generic log's path
    dataset: str = "jd"
    stages: tuple[str, ...] = ()  # cascade order; () = the dataset's default (JD: view, purchase)
    jd_dir: str = ""  # read JD .txt files from this folder instead of the copy shipped in the package
    data_dir: str = ""  # the folder of a public dataset's files in its owners' layout (kuairand, aliccp, ...)
    # KuaiRand's third stage after exposure and click (csmf.data.kuairand)
    kuairand_conversion: Literal["long_view", "is_like", "is_follow", "is_comment", "is_forward"] = "long_view"
    tenrec_conversion: Literal["like", "follow", "share"] = "like"  # Tenrec's third stage (csmf.data.tenrec)
    tenrec_file: str = ""  # which Tenrec log in data_dir (QK-video.csv, ...); "" = the only one there
    # Convert the log once into a Parquet cache in this folder and read it from there (csmf.data.cache): Ali-CCP,
    # AliExpress, KuaiRand, Tenrec, the simulator, generic logs (a per-pair hash split for logs without a split);
    # rebuilt when a source file or an option changes. "" = off
    cache_dir: str = ""
    stream_eval_users: int = 20_000  # train.stream: held-out users evaluated (a seeded sample; 0 = all)
    # in memory from the cache: keep the test pairs of this many held-out users only (a seeded sample, the users
    # data.stream_eval_users picks at the same count, so a streamed and an in-memory row are tested on the same
    # users); the 42M-row release holds 990k test users, about an hour to rank against 200k items. 0 = all
    test_users: int = 0
    user_col: str = "user_id"  # generic log: user id column
    item_col: str = "item_id"  # generic log: item id column
    timestamp_col: str = "timestamp"  # generic log: used only when split = "time"
    user_features: tuple[str, ...] | None = None  # generic log: None = infer (columns constant per user)
    item_features: tuple[str, ...] | None = None  # generic log: None = infer (columns constant per item)
    # Per-row context columns (scenario, hour, page) fed to the user tower with each row's value: None = the
    # dataset's default (Ali-CCP: 301, KuaiRand: tab, the simulator: scenario; generic logs: none, because a
    # per-row column may be an outcome such as a play time); () = none. csmf.data.context
    context_features: tuple[str, ...] | None = None
    # generic log: "random" per-user hold-out, or "time" (each user's latest rows)
    split: Literal["random", "time"] = "random"
    test_frac: float = 0.2  # share of each user's pairs held out as test (JD: of trn_pv for the click test)
    valid_frac: float = 0.1  # share of each user's remaining train pairs used as a tuning fold
    split_seed: int = 0  # seed of every random hold-out (JD click test: seed 0 by protocol)


@dataclass(frozen=True)
class SimConfig(Checked):
    SECTION: ClassVar[str] = "sim"
    RULES: ClassVar[dict] = {
        "n_users": (_positive, "> 0"),
        "n_items": (_positive, "> 0"),
        "exposures_per_user": (_positive, "> 0"),
        "dim": (_positive, "> 0"),
        "candidates_per_exposure": (_positive, "> 0"),
        "chunk_users": (_positive, "> 0"),
        "item_features": (lambda v: v >= 0, ">= 0"),
        "feature_buckets": (lambda v: v >= 2, ">= 2"),
        "scenarios": (lambda v: v >= 0, ">= 0"),
        "scenario_strength": (lambda v: v >= 0, ">= 0"),
    }

    n_users: int = 4000
    n_items: int = 3000
    exposures_per_user: int = 40  # mean; per-user counts vary (geometric-ish activity)
    dim: int = 8  # latent dimension of each affinity component
    shared_weight: float = 0.6  # share of click/conversion affinity that is common to both objectives
    candidates_per_exposure: int = 20  # logging policy draws this many popularity candidates per slot
    policy_noise: float = 0.5  # std of the logging policy's error on true exposure affinity
    click_bias: float = -2.0  # logit offset of the click probability
    conversion_bias: float = -1.5  # logit offset of P(conversion | click)
    popularity_skew: float = 0.7  # Zipf exponent of item popularity
    chunk_users: int = 2000  # users generated per streamed chunk (bounds memory)
    item_features: int = 0  # extra item features item_f0.. that carry part of the item's latent factors
    feature_buckets: int = 16  # values of each such feature (equal-mass buckets of a random projection)
    # a per-row `scenario` column with this many values (0 = none); each scenario adds its own latent vector to
    # the user's, so what a user sees, clicks and buys depends on it (request context with real signal)
    scenarios: int = 0
    scenario_strength: float = 1.0  # norm of a scenario's vector relative to a user's
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig(Checked):
    SECTION: ClassVar[str] = "eval"
    RULES: ClassVar[dict] = {
        "ks": (lambda v: _nonempty(v) and _positive(v), "one or more cut-offs > 0"),
        "score_budget_mb": (_positive, "> 0"),
        "tune_metric": (METRIC.fullmatch, "recall@K or ndcg@K"),
        "valid_users": (_at_least(0), ">= 0 (0 = every validation user)"),
    }

    ks: tuple[int, ...] = (10, 20, 50)
    score_budget_mb: int = 256  # max size of one (users x items) score block; sets the user batch size
    tune_metric: str = "recall@50"  # validation metric that selects hyper-parameters
    # validation (each epoch's score, configuration and hyper-parameter searches) ranks a seeded sample of this
    # many users (0 = all of them); the reported test metrics always rank every test user
    valid_users: int = 0


@dataclass(frozen=True)
class ALSConfig(Checked):
    SECTION: ClassVar[str] = "als"
    RULES: ClassVar[dict] = {
        "factors": (lambda v: _nonempty(v) and _positive(v), "one or more sizes > 0"),
        "regularization": (_at_least(0.0), ">= 0"),
        "alpha": (_at_least(0.0), ">= 0"),
        "iterations": (_positive, "> 0"),
        "aux_weights": (_at_least(0.0), ">= 0"),
        "num_threads": (_at_least(0), ">= 0 (0 = all cores)"),
    }

    # Grids searched on the validation split of each objective; the best point is refit on train.
    factors: tuple[int, ...] = (64, 128, 256)
    regularization: tuple[float, ...] = (0.01, 0.1, 1.0)
    alpha: tuple[float, ...] = (1.0, 10.0, 40.0)  # confidence scale: C = 1 + alpha * r
    iterations: int = 15
    aux_weights: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)  # weight of other stages' train pairs in r
    num_threads: int = 0  # 0 = all cores


@dataclass(frozen=True)
class ItemKNNConfig(Checked):
    SECTION: ClassVar[str] = "itemknn"
    RULES: ClassVar[dict] = {
        "neighbours": (lambda v: _nonempty(v) and _positive(v), "one or more counts > 0"),
        "aux_weights": (_at_least(0.0), ">= 0"),
        "num_threads": (_at_least(0), ">= 0 (0 = all cores)"),
    }

    similarity: tuple[Literal["bm25", "cosine"], ...] = ("bm25", "cosine")
    neighbours: tuple[int, ...] = (50, 100, 200, 400)  # K: neighbours kept per item
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    aux_weights: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)
    num_threads: int = 0


@dataclass(frozen=True)
class EASEConfig(Checked):
    SECTION: ClassVar[str] = "ease"
    RULES: ClassVar[dict] = {
        "l2": (lambda v: _nonempty(v) and _positive(v), "one or more weights > 0"),
        "aux_weights": (_at_least(0.0), ">= 0"),
    }

    l2: tuple[float, ...] = (400.0, 100.0, 1500.0)  # ridge weight, searched on validation
    aux_weights: tuple[float, ...] = (0.2, 0.1, 0.5)  # weight of other stages' train pairs in X


@dataclass(frozen=True)
class ModelConfig(Checked):
    SECTION: ClassVar[str] = "model"
    RULES: ClassVar[dict] = {
        "dim": (_positive, "> 0"),
        "user_hidden": (_positive, "widths > 0"),
        "item_hidden": (_positive, "widths > 0"),
        "id_dim": (_positive, "> 0"),
        "history_dim": (_positive, "> 0"),
        "feature_dim": (_positive, "> 0"),
        "max_categories": (_at_least(0), ">= 0"),
        "hash_buckets": (_positive, "> 0"),
        "dropout": (_in(0.0, 1.0), "in [0, 1)"),
        "context_dropout": (_in(0.0, 1.0), "in [0, 1)"),
        "temperature": (_positive, "> 0"),
        "graph_hops": (_in(0, 4), "0, 1, 2 or 3"),
        "graph_neighbours": (_at_least(0), ">= 0 (0 = propagate over the whole graph)"),
        "history_max": (_at_least(0), ">= 0 (0 = the whole history)"),
        "graph_up_weight": (_at_least(0.0), ">= 0"),
        "graph_down_weight": (_at_least(0.0), ">= 0"),
        "graph_side_weight": (_at_least(0.0), ">= 0"),
        "init_scale": (_positive, "> 0"),
    }

    # "graph": one item table, user = degree-normalised bag of its history, both sides smoothed over the
    # multi-behaviour graph (csmf/backbones/graph.py); "mlp": ID + mean-pooled history bags -> masked MLP
    # (csmf/backbones/mlp.py). Each is a Backbone (csmf/backbones/base.py) registered by this name
    encoder: Literal["graph", "mlp"] = "graph"
    dim: int = 128  # D: the user / item vector size, split into per-stage groups by CSMF
    # user_hidden .. dropout: the MLP encoder only (the graph encoder has one D-wide item table, no dropout)
    user_hidden: tuple[int, ...] = ()  # user-tower MLP widths before the D-wide output layer (JD: linear is best)
    item_hidden: tuple[int, ...] = ()  # item-tower MLP widths (JD items are IDs only: a linear map is enough)
    id_dim: int = 64  # width of the user / item ID embeddings
    history_dim: int = 64  # width of the shared history table pooled into one bag per behaviour
    # a user-ID row in the user tower: an ID embedding (mlp) or a D-wide row added to the bag (graph, LightGCN's
    # user table); on JD it overfits or adds nothing: history + features are better there
    user_id: bool = False
    history: bool = True  # user tower reads the user's train behaviours (leave-target-out in training)
    # the user towers read each behaviour's latest history_max items (by the log's timestamps; without them a
    # seeded choice): a batch's bags cost B x history_max at most, whatever the heaviest user (0 = all of them)
    history_max: int = 0
    feature_dim: int = 16  # width of each categorical feature embedding
    # feature schema (inferred, overridable): an integer / text column is categorical (embedded), hashed into
    # hash_buckets buckets when it has more than max_categories values; a non-integer column is dense
    # (standardised); a list column is a bag (mean of its codes' embeddings)
    max_categories: int = 10_000
    hash_buckets: int = 4096
    features: bool = True  # read the loaded user and item features (false = ID-only, as csmf-id-only)
    context: bool = True  # read the per-row context columns, data.context_features (false = csmf-no-context)
    dense_features: tuple[str, ...] = ()  # columns read as dense numbers whatever their values
    categorical_features: tuple[str, ...] = ()  # columns embedded as categories even when not integers
    bag_power: float = 1.0  # a bag is sum / count**bag_power: 1 = mean, 0.5 = FISM-style sqrt, 0 = sum
    dropout: float = 0.3  # dropout on each tower's input during training
    # share of training rows whose context (data.context_features) is replaced by "unknown" (code 0), so the
    # user tower also learns a context-free vector (what a request without context, or an export, gets)
    context_dropout: float = 0.2
    temperature: float = 0.1  # softmax temperature of the training loss (scores are u . v)
    graph_hops: int = 2  # graph encoder: item-smoothing steps S = Â^T Â (0-3); the user reads the smoothed items
    # graph encoder: > 0 = the smoothing as one operator per stage graph holding each item's top-K neighbours in the
    # smoothed co-occurrence, built once (csmf/backbones/neighbours.py); 0 = propagate over the whole graph in
    # every step (exact)
    graph_neighbours: int = 0
    graph_up_weight: float = 0.2  # graph encoder: edge weight of earlier stages' pairs in a stage's graph
    graph_down_weight: float = 1.0  # ... of later stages' pairs (a purchase implies the view)
    graph_side_weight: float = 0.5  # ... of side behaviours (JD favorites)
    init_scale: float = 0.1  # graph encoder: std of the initial item table
    # graph encoder: a positive's score in the training loss leaves out its own share of the user's bag (the bag holds
    # the training targets); off: it did not stop the 2.2M-row simulator's memorising (docs/method.md), decay did
    graph_leave_target_out: bool = False


# past this catalogue size the size rules act (csmf.rules.fit_to_size; the candidates of csmf.selection)
SCALE_ITEMS = 100_000


@dataclass(frozen=True)
class TrainConfig(Checked):
    SECTION: ClassVar[str] = "train"
    RULES: ClassVar[dict] = {
        "batch_size": (_positive, "> 0"),
        "user_batch_size": (_positive, "> 0"),
        "lr": (lambda v: _nonempty(v) and _positive(v), "one or more rates > 0"),
        "max_epochs": (lambda v: _nonempty(v) and _positive(v), "one or more epoch counts > 0"),
        "patience": (_positive, "> 0"),
        "full_softmax_max_items": (_at_least(0), ">= 0"),
        "extra_negatives": (_at_least(0), ">= 0"),
        "pool_items": (_positive, "> 0"),
        "select_metric": (METRIC.fullmatch, "recall@K or ndcg@K"),
        "aux_weight": (lambda v: _nonempty(v) and _at_least(0.0)(v), "one or more weights >= 0"),
        "distill_top": (_positive, "> 0"),
        "weight_decay": (_at_least(0.0), ">= 0"),
        "distill_decay": (_positive, "> 0"),
        "distill_check": (_in(0.0, 1.0, closed_high=True), "in [0, 1]"),
        "distill_weight": (lambda v: _nonempty(v) and _at_least(0.0)(v), "one or more weights >= 0"),
        "stream_buffer_rows": (_positive, "> 0"),
        "sparse_table_rows": (_at_least(0), ">= 0 (0 = only when streaming)"),
    }

    batch_size: int = 1024  # training pairs per batch (in-batch negatives)
    user_batch_size: int = 512  # graph encoder, full-catalogue loss: users per batch (all their positives at once)
    lr: tuple[float, ...] = (1e-2,)  # Adam learning rate per trained stage (last value repeats)
    # decoupled weight decay (AdamW's): each step shrinks what the phase trains by lr x this, and nothing else (earlier
    # stages stay bit-identical). 0 = plain Adam; past 100,000 items the graph encoder takes 1.0 (csmf.rules)
    weight_decay: float = 0.0
    max_epochs: tuple[int, ...] = (24,)  # per trained stage (last value repeats); best epoch on validation
    # stop a stage after this many epochs without a validation gain: on JD 2 picks the same epochs as 4 on seeds 1
    # and 2 and better purchases on seed 0 (docs/method.md, training speed), ~8 epochs sooner
    patience: int = 2
    # Full-catalogue softmax up to this many items, else in-batch + logQ. The graph encoder computes every item
    # vector each step anyway, so its full softmax (one per user) is cheap on JD-sized catalogues; the MLP
    # preset uses 0 (in-batch + 2048 uniform negatives matched the full softmax there: docs/method.md).
    full_softmax_max_items: int = 100_000
    extra_negatives: int = 2048  # in-batch mode: uniformly sampled extra negatives per batch
    # the per-user loss (graph encoder) past full_softmax_max_items: a step scores its users against every item
    # of theirs it reads (positives, teacher lists) and this many items drawn uniformly, shared by the batch and
    # weighted to stand for the rest of the catalogue (csmf.stage_loss.UserLoss)
    pool_items: int = 8192
    select_metric: str = "recall@50"  # validation metric that picks each stage's best epoch
    # Each stage also trains on the pairs of the behaviours before it (upstream stages, side behaviours
    # such as JD favorites) at this loss weight, as ALS and item-kNN use them; 0 = the stage's pairs only.
    aux_weight: tuple[float, ...] = (0.2,)  # per trained stage (last value repeats)
    # Distillation: a teacher fit on the same training data ("ease", "als", "itemknn"; "" = off) gives each
    # training user its top-`distill_top` unseen items weighted exp(-rank / distill_decay); the student adds the
    # cross-entropy of its full-catalogue softmax (seen items masked) against that list at `distill_weight`.
    distill: Literal["ease", "als", "itemknn", ""] = "ease"
    distill_top: int = 100
    distill_decay: float = 5.0  # a sharp list: a flat one (20) lifted R@50 but cost N@50 on JD
    distill_weight: tuple[float, ...] = (1.0,)  # per trained stage (last value repeats)
    # a stage drops its teacher when its lists find less than this share of the validation pairs that as many most
    # popular unseen items find (on the validation sample; 0 = never): on the 2.2M-row simulator the item-kNN
    # teacher is near random (test R@50 0.0002 against popularity's 0.049) and pulled the student toward noise. Not
    # 1: on small logs a teacher a little under popularity at its 100 items still lifts the student (the golden fits)
    distill_check: float = 0.5
    # keep each teacher's lists on disk by the fingerprint of the training data and the teacher's settings
    # ($XDG_CACHE_HOME/csmf/teachers, else ~/.cache/csmf/teachers) and read them back on the same data
    teacher_cache: bool = True
    # Out of core: train from data.cache_dir in shuffled batches instead of from pairs in memory (needs the MLP
    # encoder, in-batch + sampled softmax, no distillation: --config stream; history bags read each user's latest
    # model.history_max items, built once from the cache)
    stream: bool = False
    # several training processes (csmf train --nproc): in-batch negatives from every rank's batch (all-gathered
    # item vectors, logQ over them) instead of the rank's own share of the batch
    gather_negatives: bool = False
    stream_buffer_rows: int = 1 << 20  # rows shuffled together when streaming (memory: ~16 bytes a row)
    # an ID table (the MLP encoder's user or item IDs, and its history table) of at least this many rows steps
    # row-sparse in memory too (SparseAdam, lazy: only the rows a batch touches move), as streamed training always
    # does: a dense Adam step over a 1M x 64 table took 220 ms against 4 ms sparse, 13 ms against 3 ms at 100k rows.
    # A row-sparse table takes no train.weight_decay. 0 = dense in memory
    sparse_table_rows: int = 100_000


@dataclass(frozen=True)
class CascadeConfig(Checked):
    SECTION: ClassVar[str] = "cascade"
    RULES: ClassVar[dict] = {
        "tau": (lambda v: _nonempty(v) and _in(0.0, 1.0)(v), "one or more thresholds in [0, 1)"),
        "fixed_fraction": (lambda v: v < 1.0, "< 1 (a share; < 0 = CPP's overall share)"),
        "recover_frac": (_in(0.0, 1.0, closed_high=True), "in [0, 1]"),
        "recover_skip": (_in(0.0, 1.0), "in [0, 1)"),
        "recover_epochs": (_at_least(0), ">= 0"),
        "aml_m0": (_at_least(0.0), ">= 0"),
        "min_share": (_in(0.0, 1.0), "in [0, 1)"),
        "packnet_fraction": (lambda v: 0.0 < v < 1.0, "in (0, 1)"),
        "objectives": (lambda v: len(set(v)) == len(v), "stage names without repeats"),
    }

    tau: tuple[float, ...] = (0.1,)  # CPP: free the smallest units holding <= tau of a layer's L1 mass, per stage
    # "cpp"; "fixed" (PackNet's fixed share: the "w/o CPP" ablation and the packnet baseline); "none" (no masks:
    # each stage fine-tunes every weight and all objectives score with the final model, the naive-ft baseline)
    prune: Literal["cpp", "fixed", "none"] = "cpp"
    fixed_fraction: float = -1.0  # "fixed": share of a stage's units freed per layer; < 0 = CPP's overall share
    recover_frac: float = 0.3  # AR: share of the stage's train pairs D' re-trained after pruning (0 = no AR)
    recover_epochs: int = 1
    # what AR's share draws: "pairs" (each pair with probability recover_frac) or "users" (each user with all of
    # its pairs). A per-user step costs about the same whatever share of a user's pairs it holds (the user's
    # history bag and the pooled items), so a pair draw keeps every user and AR costs a whole epoch (in-memory
    # training; streamed rows are drawn one by one)
    recover_by: Literal["pairs", "users"] = "pairs"
    # skip AR when pruning cost at most this share of the stage's best validation metric (0 = AR always runs):
    # past 100,000 items 0.05 (csmf.rules), where AR costs a pass over the users and pruning a well-trained stage
    # costs little (2.2M-row simulator: 0.0565 -> 0.0556), yet pruning after one epoch of near-random feature
    # embeddings cost 92% (42M-row release: 0.047 -> 0.004), which only AR brings back
    recover_skip: float = 0.0
    aml_m0: float = 1.0  # AML margin scale in logit units (0 = w/o AML)
    # "margin": m0 * upstream-miss share taken off the positive's logit (the notes' default); "weight": the
    # same quantity as an extra loss weight 1 + m (the margin saturates: docs/method.md, AML finding)
    # "hinge": a cross-stage hinge on top of the softmax, ranking each stage positive above an upstream-only
    # positive of the same user (viewed but not bought) by m0 * sigmoid((upstream score gap) / T)
    aml_form: Literal["margin", "weight", "hinge"] = "margin"
    # each stage that follows keeps at least this share of the output dimensions: CPP frees at least
    # min_share * D * (stages still to come) output units, so a 3-stage cascade gives its last objective room
    min_share: float = 0.125
    packnet_fraction: float = 0.5  # the packnet baseline: share of a stage's units freed per layer (PackNet's 50%)
    # the data's stages the cascade trains, in this order (() = every stage, in data.stages order); training fewer
    # leaves a stage of the data to add later with `csmf extend`, which appends it here
    objectives: tuple[str, ...] = ()


@dataclass(frozen=True)
class MultiTaskConfig(Checked):
    """The multi-task two-tower baselines (shared-bottom, mmoe, ple, mvke); inputs, D, loss as `model`/`train`."""

    SECTION: ClassVar[str] = "multitask"
    RULES: ClassVar[dict] = {
        "expert_dim": (_positive, "> 0"),
        "experts": (_positive, "> 0"),
        "specific_experts": (_at_least(0), ">= 0"),
        "kernels": (_positive, "> 0"),
        "kernel_dim": (_positive, "> 0"),
        "min_steps": (_positive, "> 0"),
        "lr": (_positive, "> 0"),
        "lr_batch": (_at_least(0), ">= 0 (0 = no scaling)"),
        "max_epochs": (_positive, "> 0"),
        "patience": (_positive, "> 0"),
    }

    expert_dim: int = 128  # hidden width of each expert (shared-bottom: its one shared expert)
    experts: int = 4  # MMoE: experts shared by every objective; PLE: its shared experts
    specific_experts: int = 1  # PLE: experts of each objective's own
    kernels: int = 4  # MVKE: virtual-kernel experts on the user side
    kernel_dim: int = 32  # MVKE: width the user's input fields are projected to for the kernels' attention
    # the per-user full-catalogue loss (graph encoder): a batch holds at most 1/min_steps of the users (and at most
    # train.user_batch_size), so an epoch takes at least this many steps: the gated MLPs learn in steps, and with
    # 4 steps an epoch on a 2,000-user log MMoE stopped at 0.197 mean validation R@50, 32 gave 0.283 (docs/method.md)
    min_steps: int = 32
    # their own schedule: one joint run learns every objective at once, where the cascade trains a stage at a time.
    # On the simulator (3 seeds) the cascade's lr 1e-2 let the shared bottom collapse on 2 seeds of 3 (exposure
    # R@50 0.16 / 0.24 / 0.22) and MVKE still improved at its 24th epoch; lr 3e-3 with up to 48 epochs and
    # patience 8 lifted every tower (docs/method.md)
    lr: float = 3e-3
    # the per-user loss on a larger log: batches of more than lr_batch users take lr * sqrt(batch / lr_batch), Adam's
    # square-root scaling rule (Malladi et al., NeurIPS 2022): on JD (335 users a step) lr 3e-3 left MMoE still
    # improving at its 46th epoch (20 min a fit); the scaled 6.9e-3 reached its mean validation R@50 of epoch 33
    # (0.360) by epoch 21 (docs/method.md). 0 = lr as given at every size
    lr_batch: int = 64
    max_epochs: int = 48
    patience: int = 8


def _candidates(v) -> bool:
    return all(isinstance(c, str) and c.strip() and "=" not in c.split()[0] for c in v)


@dataclass(frozen=True)
class SelectConfig(Checked):
    """Choosing CSMF's configuration on validation (csmf.selection), as `csmf bench` tunes ALS and item-kNN."""

    SECTION: ClassVar[str] = "select"
    RULES: ClassVar[dict] = {
        "candidates": (_candidates, "candidates, each a preset name and then section.field=value settings"),
        "budget_s": (_at_least(0.0), ">= 0 (0 = no limit)"),
        "variant_gap": (lambda v: 0.0 <= v < 1.0, "in [0, 1) (0 = fit every variant)"),
    }

    # each candidate: a preset (csmf/presets: graph, mlp, ...) and then settings on top, e.g. "graph
    # model.graph_hops=1"; every key the user set (--config, --set) is pinned in all of them, so candidates that
    # pinning makes equal collapse into one; fewer than two left = no search. () = no search. One smoothing hop
    # beside two: propagation over-smooths a denser graph (simulator at 120 exposures a user, validation R@50
    # 0.3307 at one hop against 0.3033 at two; docs/method.md), and a graph fit is cheap beside an MLP one
    candidates: tuple[str, ...] = ("graph", "mlp", "graph model.graph_hops=1")
    # seconds the search may take: a candidate is not started when the mean fit so far would pass it (the
    # first always runs); 0 = no limit. A guard for large logs: a search cut short may keep the weaker encoder
    budget_s: float = 900.0
    # a variant (a preset and settings, e.g. "graph model.graph_hops=1") is not fit when its bare preset, a candidate
    # fit before it, scored more than this share below the best mean so far: a setting moved a preset's validation by
    # at most 9% on the logs measured (one hop against two at 120 exposures a user), and on the 40k-user, 118k-item
    # log the graph's second fit (254 s of an 824 s search) scored 0.036 after the graph's 0.024, against 0.058.
    # 0 = fit every variant
    variant_gap: float = 0.25
    # keep the pick by data fingerprint and candidate list, and reuse it (training the pick alone) on the same
    # data: in store_dir ("" = $XDG_CACHE_HOME/csmf/selections, else ~/.cache/csmf/selections)
    reuse: bool = True
    store_dir: str = ""


@dataclass(frozen=True)
class BenchConfig(Checked):
    SECTION: ClassVar[str] = "bench"
    RULES: ClassVar[dict] = {
        "cost_users": (_positive, "> 0"),
        "cost_items": (_at_least(0), ">= 0 (0 = no cost measurement)"),
        "sweep_points": (lambda v: v == 0 or v >= 2, "0 (no sweep) or >= 2"),
        "sweep_max_scores": (_at_least(0), ">= 0 (0 = every test user)"),
        "cold_items": (lambda v: v >= 0, ">= 0"),
        "suite_taus": (_in(0.0, 1.0), "thresholds in [0, 1)"),
        "suite_tau_seeds": (_at_least(0), ">= 0 (0 = every seed)"),
        "suite_multitask_seeds": (_at_least(0), ">= 0 (0 = every seed)"),
        "suite_cost_items": (_at_least(0), ">= 0 (0 = no cost measurement)"),
        "suite_sim_users": (_at_least(0), ">= 0"),
        "suite_sim_items": (_at_least(0), ">= 0"),
        "tune_max_fits": (_at_least(0), ">= 0 (0 = no cap)"),
    }

    models: tuple[str, ...] = ("popularity", "als", "itemknn")
    out_dir: str = "results"
    cost_users: int = 1024  # query batch of the cost measurement (fused top-50 per user)
    # synthetic catalogue size of the cost measurement; 0 = no cost measurement (timing 1M synthetic items is most
    # of a small log's bench time, so plain `csmf bench` measures it only when asked; the suite's rows do)
    cost_items: int = 0
    # objective-weight sweep: weights per pair of objectives (0 = no sweep; csmf.experiments.sweep)
    sweep_points: int = 6
    # the sweep's score cells (test users x items) per objective; past it, a sample of users drawn with the seed
    # (the result says how many): JD's 6,959 view users x 13,465 items are within it (0 = every user)
    sweep_max_scores: int = 200_000_000
    # > 0: also evaluate every model on the test pairs of items with at most this many training pairs
    # (a cold-item split: where features must carry the item), written as "cold_items" in its result
    cold_items: int = 0
    tune: bool = True  # False = no search: the settings' defaults (a grid's first value if the default is off-grid)
    # the fits one objective's search may take (ALS, item-kNN, EASE), in the search's fixed order, so a capped search is
    # as deterministic as a full one (0 = no cap; past 100,000 items csmf bench caps it, csmf.rules.cap_tuning)
    tune_max_fits: int = 0
    # Neural models: share stage-1 pretraining between runs through this folder ("" = off; see csmf.cascade)
    pretrain_cache: str = ""
    checkpoint_dir: str = ""  # neural models: phase checkpoints here, so a killed run resumes ("" = none)
    # `csmf bench --suite`: seeds, datasets and the tau sweep of the paper suite
    suite_seeds: tuple[int, ...] = (0, 1, 2)
    suite_datasets: tuple[str, ...] = ("jd", "sim")
    suite_taus: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    # rows that only the tau sweep uses (csmf-tau0.05, ...) run the first this-many seeds (0 = every seed):
    # with one, the sweep costs a third and the suite fits its 2-hour budget; csmf itself runs every seed
    suite_tau_seeds: int = 1
    # the multi-task rows (shared-bottom, mmoe, ple, mvke) run the first this-many seeds (0 = every seed): on JD one
    # of their fits takes 5-10 min on 2 cores (a gated tower over the whole catalogue in every step, for 15-30
    # epochs), so 3 seeds of 4 models alone would take the suite's 2 hours (docs/method.md)
    suite_multitask_seeds: int = 1
    suite_cost_items: int = 1_000_000  # the suite's cost measurement: synthetic catalogue size (first seed per row)
    # run only these rows (csmf, als, csmf-tau0.3, ...; () = all); the others keep the results they have
    suite_rows: tuple[str, ...] = ()
    # the suite simulates a smaller cascade than `csmf bench --dataset sim` so 3 seeds of every row fit the
    # 2-hour budget on 2 cores next to JD (0 = keep [sim] as it is)
    suite_sim_users: int = 2000
    suite_sim_items: int = 1500
    report_dir: str = "reports"
    # `csmf bench --suite scale` (csmf.experiments.scale): its logs, its rows (each a `csmf bench` process) and
    # settings every row takes (--set bench.scale_sets=... to try a configuration at scale)
    scale_datasets: tuple[str, ...] = ("sim-2m", "aliccp-42m")
    scale_rows: tuple[str, ...] = ("popularity", "als", "itemknn", "stream", "csmf", "csmf-history")
    scale_sets: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuntimeConfig(Checked):
    """Where training runs; never what it learns (a run folder resumes on another device)."""

    SECTION: ClassVar[str] = "runtime"
    RULES: ClassVar[dict] = {"row_reduce_rows": (_at_least(0), ">= 0 (0 = dense all-reduce)")}

    # "cpu"; "cuda" (the MLP encoder: towers, losses, validation on the GPU; an error without one); "auto" =
    # cuda when a GPU is present, else cpu. The trained model is handed back on the CPU (export, serving).
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    amp: bool = False  # cuda: bfloat16 autocast for the towers and losses (mixed precision)
    # several processes: an ID table of at least this many rows averages its gradient over the ranks by the rows
    # each rank's batch touched (all-gathered), not by a dense all-reduce of the whole table every step
    # (csmf.distributed.reduce_rows); 200k items x D 128 is 100 MB a step dense. 0 = every table dense
    row_reduce_rows: int = 50_000


@dataclass(frozen=True)
class ServeConfig(Checked):
    """`csmf serve` (and the server `csmf loadtest` starts, the HNSW settings `csmf querybench` measures)."""

    SECTION: ClassVar[str] = "serve"
    RULES: ClassVar[dict] = {
        "hnsw_m": (_positive, "> 0"),
        "ef_search": (_positive, "> 0"),
        "threads": (_at_least(0), ">= 0"),
        "workers": (_positive, "> 0"),
        "max_ids": (_positive, "> 0"),
        "max_results": (_positive, "> 0"),
        "max_body_bytes": (_positive, "> 0"),
        "drain_seconds": (_positive, "> 0"),
        "port": (_in(1, 65536), "a port, 1..65535"),
    }

    index: Literal["exact", "hnsw", "milvus"] = "exact"  # exact (BLAS), faiss HNSW, or Milvus (serve.milvus_uri)
    milvus_uri: str = "csmf-milvus.db"  # a .db file (embedded milvus-lite) or a server, http://host:19530
    hnsw_m: int = 32  # HNSW graph degree M
    ef_search: int = 128  # HNSW efSearch: candidates kept while searching (recall against speed)
    # HNSW graph file: read when built from this artifact's item vectors with this M, else built and written
    # there ("" = build in memory at every start; a 1M-item graph takes minutes)
    hnsw_file: str = ""
    threads: int = 1  # threads of one batched search; 1 leaves the other cores to HTTP and other workers; 0 = all
    workers: int = 1  # server processes sharing the port and the memory-mapped vectors (items then read-only)
    fallback: Literal["none", "popularity"] = "none"  # unknown users: 404, or the most popular items
    max_ids: int = 1000  # most user ids in one POST /recommend
    max_results: int = 20_000  # most items one request may ask for (user ids x k)
    max_body_bytes: int = 1 << 20  # largest request body; a larger one answers 413 before it is parsed
    # POST /items and DELETE /items/{id}: off (403) unless on, and then only with the bearer token, read from the
    # CSMF_WRITE_TOKEN environment variable or serve.write_token_file (docs/security.md)
    allow_writes: bool = False
    write_token_file: str = ""  # a file whose first line is the write token ("" = CSMF_WRITE_TOKEN)
    # on SIGTERM: stop accepting, let requests in flight finish for up to this long, then cancel what is left
    drain_seconds: float = 20.0
    host: str = "127.0.0.1"
    port: int = 8000


@dataclass(frozen=True)
class TrackConfig(Checked):
    """Experiment tracking of training runs (csmf.tracking); never what a model learns."""

    SECTION: ClassVar[str] = "track"

    tensorboard: bool = True  # TensorBoard event files in the run folder (<out>/tensorboard) when tensorboard is there
    # an MLflow tracking URI (http://host:5000, file:/path/mlruns): each run logs its config, metrics and saved model
    # there ("" = no MLflow run; set = mlflow must be installed)
    mlflow_uri: str = ""
    mlflow_experiment: str = "csmf"  # the MLflow experiment the runs go to (created when missing)


@dataclass(frozen=True)
class Config:
    """The one typed, frozen config of a run: a `seed` and one section per concern (data, model, train, ...).

    Build it with `Config()`, `load_config(path)` or `override(cfg, ["section.field=value"])`; every field is
    checked when its section is built, and the configuration reference lists each one with its default.
    """

    seed: int = 0  # model seed (data split seeds live in DataConfig / SimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    als: ALSConfig = field(default_factory=ALSConfig)
    itemknn: ItemKNNConfig = field(default_factory=ItemKNNConfig)
    ease: EASEConfig = field(default_factory=EASEConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    multitask: MultiTaskConfig = field(default_factory=MultiTaskConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def __post_init__(self) -> None:
        for key, metric in (
            ("eval.tune_metric", self.eval.tune_metric),
            ("train.select_metric", self.train.select_metric),
        ):
            k = int(metric.split("@")[1])
            if k not in self.eval.ks:
                raise ConfigError(f"{key}: {metric!r} needs K = {k} in eval.ks, which are {list(self.eval.ks)}")


# sections that say where results go, how to serve and what to record, never what a model learns
HARNESS = ("bench", "serve", "runtime", "track")
# data.dataset values that name a dataset rather than a file
NAMED_DATASETS = ("jd", "sim", "kuairand", "aliccp", "aliexpress", "tenrec")
# where the data lives: its content is compared by fingerprint instead
DATA_LOCATION = ("dataset", "jd_dir", "data_dir")


def training_part(config: dict) -> dict:
    """A saved config (config_to_dict) without its harness sections and data location: what decides a
    model's weights and metrics. Run folders resume (with the data fingerprint) and suite results are
    reused (per dataset folder) only when this part matches."""
    out = {k: v for k, v in json.loads(json.dumps(config)).items() if k not in HARNESS}  # tuples as lists
    if isinstance(out.get("data"), dict):
        out["data"] = {k: v for k, v in out["data"].items() if k not in DATA_LOCATION}
    return out


def same_training(stored: dict, current: dict) -> bool:
    """Whether a saved config (config_to_dict) trains what `current` trains: every training field it recorded
    equals the current one. A field added to the config since it was saved is not in it and does not count: a
    new field's default keeps the behaviour that held before it existed (so an upgrade resumes old runs)."""
    stored, current = training_part(stored), training_part(current)
    for section, values in stored.items():
        if not isinstance(values, dict):
            if current.get(section) != values:
                return False
            continue
        now = current.get(section, {})
        if any(now.get(k, v) != v for k, v in values.items()):
            return False
    return True


def absolute_data_paths(cfg: Config) -> Config:
    """The config with its data paths made absolute (`jd` and `sim` stay names), for a run folder."""
    d = cfg.data
    dataset = d.dataset if d.dataset in NAMED_DATASETS else str(Path(d.dataset).expanduser().resolve())
    jd_dir = str(Path(d.jd_dir).expanduser().resolve()) if d.jd_dir else ""
    data_dir = str(Path(d.data_dir).expanduser().resolve()) if d.data_dir else ""
    return replace(cfg, data=replace(d, dataset=dataset, jd_dir=jd_dir, data_dir=data_dir))


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the field."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a TOML/CLI value into the declared field type, or raise naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:  # checked against its choices when the section is built
        return value.strip() if isinstance(value, str) else value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip() != ""]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value).strip() if isinstance(value, str) else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {}
    for name, raw in values.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(raw, dict):
                raise ConfigError(f"{key}: expected a table, got {raw!r}")
            kwargs[name] = _build(hint, raw, key)
        else:
            kwargs[name] = _coerce(raw, hint, key)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")


PRESETS = Path(__file__).parent / "presets"


def presets() -> list[str]:
    """Names of the config files shipped with csmf (`--config <name>`)."""
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def _config_file(path: str | Path) -> Path:
    """A config file's path, or the shipped preset a bare name (`mlp`) stands for."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and (PRESETS / f"{path}.toml").exists():
        return PRESETS / f"{path}.toml"
    if not path.exists() and path.suffix == "":
        raise ConfigError(f"config file {path} does not exist and is not a preset; presets: {presets()}")
    return path


def load_config(path: str | Path) -> Config:
    """A TOML config file, or the name of a shipped preset (`mlp`: the previous MLP backbone's settings)."""
    path = _config_file(path)
    values = _read_toml(path)
    try:
        return config_from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists, None dropped) — the saved form of a config."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = config_to_dict(value)
        elif value is None:
            continue
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(config_to_dict(cfg)))


def override(cfg: Config, assignments: list[str]) -> Config:
    """Apply `section.field=value` assignments (from `--set`) to a config."""
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"--set {assignment!r}: expected section.field=value")
        dotted, raw = assignment.split("=", 1)
        parts = dotted.strip().split(".")
        cfg = _override_path(cfg, parts, raw, dotted)
    return cfg


def leaves(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every field of a config as dotted key -> value (tuples as lists): what `with_values` takes back."""
    out: dict[str, Any] = {}
    for key, value in config_to_dict(cfg).items() if not isinstance(cfg, dict) else cfg.items():
        if isinstance(value, dict):
            out |= leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """`cfg` with each dotted key set to its value (typed values, as TOML or `leaves` give them)."""
    for dotted, value in values.items():
        cfg = _override_path(cfg, dotted.split("."), value, dotted)
    return cfg


def read_leaves(path: str | Path) -> dict[str, Any]:
    """The dotted keys a TOML config file (or shipped preset) sets, with their values."""
    return leaves(_read_toml(_config_file(path)))


def override_from_file(cfg: Config, path: str | Path) -> Config:
    """Apply only the keys a TOML file sets (each as if given with --set) to an existing config."""
    path = Path(path)
    values = _read_toml(path)

    def leaves(table: dict, prefix: str):
        for key, value in table.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    try:
        for dotted, value in leaves(values, ""):
            cfg = _override_path(cfg, dotted.split("."), value, dotted)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return cfg


def _override_path(obj: Any, parts: list[str], raw: Any, dotted: str) -> Any:
    name = parts[0]
    hints = typing.get_type_hints(type(obj))
    if name not in hints:
        known = sorted(f.name for f in fields(obj))
        raise ConfigError(f"--set {dotted}: unknown key {name!r}; known keys here: {known}")
    current = getattr(obj, name)
    if len(parts) == 1:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"--set {dotted}: {name!r} is a section; name one of its fields")
        return replace(obj, **{name: _coerce(raw, hints[name], dotted)})
    if not dataclasses.is_dataclass(current):
        raise ConfigError(f"--set {dotted}: {name!r} is not a section")
    return replace(obj, **{name: _override_path(current, parts[1:], raw, dotted)})
