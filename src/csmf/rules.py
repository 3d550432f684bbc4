"""Cross-field rules of a training config: settings each valid alone that cannot train together.

`check_training(cfg)` runs before any data loads (csmf train and csmf bench call it first), and again, with the
catalogue size, when a trainer is built; a broken combination is one ConfigError that names every key involved
and what to change, never a traceback at the first batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

from csmf.backbones import BACKBONES
from csmf.config import SCALE_ITEMS, Config, ConfigError


def training_problems(cfg: Config, n_items: int | None = None, streaming: bool | None = None,
                      device: str | None = None, cascade: bool = True) -> list[str]:  # fmt: skip
    """Every broken combination in `cfg`, in words naming its keys. n_items: the catalogue, once known;
    streaming: whether the data streams from a cache (None: judged from data.cache_dir); device: the device
    runtime.device resolved to ("auto" finds a GPU or not), once known; cascade: False for the multi-task towers,
    which read the encoder, the loss and the teacher but no AML and train on the CPU (the hinge and device
    rules are the cascade's)."""
    m, t, c = cfg.model, cfg.train, cfg.cascade
    backbone = BACKBONES[m.encoder]
    problems = []
    # the per-user loss: a backbone that takes every positive of a user at once (the cascade's at any size, over a
    # pool past the limit; the multi-task towers' within the size limit only)
    limit = f"train.full_softmax_max_items = {t.full_softmax_max_items:,}"
    if t.stream:  # whatever the encoder: a stream's batches are shuffled rows, never a user with all its positives
        per_user = "train.stream = true trains on streamed rows"
    elif not backbone.per_user_loss:
        per_user = f"model.encoder = {m.encoder!r} trains on batches of pairs (only 'graph' has it)"
    elif not cascade and (
        t.full_softmax_max_items == 0 or (n_items is not None and n_items > t.full_softmax_max_items)
    ):
        per_user = f"{limit} is below the catalogue" + (f" of {n_items:,} items" if n_items is not None else "")
    else:
        per_user = ""
    other = ("train.stream = false" if t.stream else
             "model.encoder = 'graph' with train.full_softmax_max_items at least the number of items")  # fmt: skip
    if cascade and per_user and c.aml_form == "hinge":
        problems.append(f"cascade.aml_form = 'hinge' needs the per-user full-catalogue loss, but {per_user}; set "
                        f"cascade.aml_form = 'margin' (or 'weight'), or {other}")  # fmt: skip
    if per_user and t.distill:
        # streamed, not for the catalogue's size: the teacher is fit on every training pair in memory, and its lists
        # train the per-user loss, whose batch is a user with all its positives (docs/scale.md)
        why = (" (a teacher does not stream: it is fit on every training pair in memory, and its lists are read by "
               "the loss of a user with all its positives)" if t.stream else "")  # fmt: skip
        problems.append(f"train.distill = {t.distill!r} needs the per-user full-catalogue loss, but {per_user}{why}; "
                        f"set train.distill = '' (no teacher), or {other}")  # fmt: skip
    if t.stream:
        problems += _stream_problems(cfg, streaming)
    device = device or (cfg.runtime.device if cfg.runtime.device != "auto" else None)
    if cascade and device is not None and device not in backbone.devices:
        usable = [name for name, b in BACKBONES.items() if device in b.devices]
        chose = f" (runtime.device = 'auto' chose {device})" if cfg.runtime.device == "auto" else ""
        problems.append(f"runtime.device = {device!r}{chose}: model.encoder = {m.encoder!r} trains on "
                        f"{list(backbone.devices)} only; use model.encoder = {usable[0]!r} (--config mlp) there, or "
                        "runtime.device = 'cpu'")  # fmt: skip
    return problems


# the graph encoder's neighbours per item when a pair loss replaces the full-catalogue one (docs/method.md)
SCALE_NEIGHBOURS = 32
# Past this catalogue (whatever the loss: the MLP preset is always past its limit of 0, and must not change on a
# small log) a user's bag reads each behaviour's latest SCALE_HISTORY items (a heavy user's whole history would set
# a step's cost; the scale suite's logs hold 20-42 rows a user, so it binds for the tail only), and validation ranks
# a sample of SCALE_VALID_USERS users (each is ranked against the whole catalogue every epoch: 90k users x 194k
# items on the 2.2M-row simulator is minutes an epoch; 10,000 users measure R@50 to about +-0.005)
SCALE_HISTORY, SCALE_VALID_USERS = 200, 10_000
# ... and a teacher's list stops at rank SCALE_LIST_DECAYS x train.distill_decay, where its exp(-rank / decay) weights
# leave e^-5 = 0.7% of their mass: each listed item is a column of every step (with its neighbours, the larger part
# of a pooled step on the 2.2M-row simulator), and 100k users x 100 items is 120 MB a stage held in memory
SCALE_LIST_DECAYS = 5
# ... and the graph encoder trains with decoupled weight decay (train.weight_decay): on the 2.2M-row simulator (7
# training pairs an item) stage-1 validation R@50 fell from the first steps without it (0.014 after 150 steps, in-
# sample fit rising) and rose with it (0.018, 0.029, 0.030 after 50, 100, 150 steps; docs/method.md)
SCALE_WEIGHT_DECAY = 1.0
# ... and the in-memory cascade's schedule is bounded (either encoder): an epoch there is minutes (the graph encoder:
# 195 steps of 512 users, validation on the sample), so a stage stops at the first epoch without a gain
# (train.patience 1) and after SCALE_EPOCHS at most, and AR is skipped where pruning cost little
# (cascade.recover_skip, below): on the 2.2M-row simulator AR after stage 1's pruning lowered validation R@50
# whether it drew pairs (0.0305 -> 0.0303, 216 s: a pair draw keeps every user, so it costs a whole epoch) or users
# (cascade.recover_by, 0.0320 -> 0.0256, 76 s), and after stage 2's in the run before (0.037 -> 0.035)
SCALE_PATIENCE, SCALE_EPOCHS = 1, 3
# ... and AR runs only where pruning cost more than this share of the stage's validation metric (cascade.recover_skip):
# skipping it always (the rule before) left the 42M-row release's exposure at R@50 0.004 after pruning (0.047 before)
SCALE_RECOVER_SKIP = 0.05
# ... and where it runs, AR re-trains on this share of the stage's pairs (cascade.recover_frac): on the 42M-row
# release AR on 30% (9M pairs) took 1,212 s, a third of stage 1's epoch; a tenth is still 3M pairs, more than the
# whole first stage of the 2.2M-row simulator
SCALE_RECOVER_FRAC = 0.1


def fit_to_size(cfg: Config, n_items: int | None = None, pinned: Iterable[str] | None = None,
                cascade: bool = True) -> tuple[Config, list[str]]:  # fmt: skip
    """The configuration that trains on a catalogue of `n_items`, and a note per key it changed:
    - past `train.full_softmax_max_items` the graph encoder smooths through each item's nearest neighbours
      (`model.graph_neighbours`) instead of the whole graph in every step, so a pooled step reads its batch's rows;
    - streamed with history bags (any size), the bags read each behaviour's latest `model.history_max` items:
      every user's are held in memory, built once from the cache;
    - past 100,000 items (SCALE_ITEMS) the user towers read each behaviour's latest `model.history_max` items, a
      teacher's list keeps the ranks that hold its weight (`train.distill_top`) and validation ranks a sample of
      `eval.valid_users` users;
    - where no per-user loss trains (a pair-loss encoder, streamed rows, the multi-task towers past the limit), a
      default teacher is turned off: its lists are read by that loss only.
    A key the user set (`pinned`: default, every value off the defaults) is never changed: check_training then
    names the conflict. n_items None: the catalogue is not known yet (only a limit of 0 counts as past it).
    cascade: False for the multi-task towers, whose per-user loss needs the whole catalogue."""
    from csmf.selection import pins

    pinned = set(pins(cfg) if pinned is None else pinned)
    m, t = cfg.model, cfg.train
    backbone = BACKBONES[m.encoder]
    past = t.full_softmax_max_items == 0 or (n_items is not None and n_items > t.full_softmax_max_items)
    size = "the catalogue is" if n_items is None else f"{n_items:,} items are"
    limit = f"{size} above train.full_softmax_max_items = {t.full_softmax_max_items:,}"
    notes = []
    if not backbone.per_user_loss or t.stream or (past and not cascade):
        why = ("rows are streamed" if t.stream else f"model.encoder = {m.encoder!r} trains on pairs"
               if not backbone.per_user_loss else limit)  # fmt: skip
        if t.distill and "train.distill" not in pinned:
            cfg = replace(cfg, train=replace(t, distill=""))
            notes.append(f"train.distill = '' (was {t.distill!r}): the teacher's lists train the per-user loss, "
                         f"and {why}")  # fmt: skip
    if past and m.encoder == "graph" and m.graph_neighbours == 0 and "model.graph_neighbours" not in pinned:
        cfg = replace(cfg, model=replace(cfg.model, graph_neighbours=SCALE_NEIGHBOURS))
        notes.append(f"model.graph_neighbours = {SCALE_NEIGHBOURS}: each item smoothed over its {SCALE_NEIGHBOURS} "
                     f"nearest neighbours, so a step reads its batch's rows only ({limit})")  # fmt: skip
    big = n_items is not None and n_items > SCALE_ITEMS
    large = f"{n_items:,} items are above {SCALE_ITEMS:,}" if big else ""
    bags = m.encoder == "graph" or m.history  # the user tower reads history bags
    big_bags, streamed_bags = big and cascade and bags, cascade and t.stream and m.history
    if (big_bags or streamed_bags) and m.history_max == 0 and "model.history_max" not in pinned:
        cfg = replace(cfg, model=replace(cfg.model, history_max=SCALE_HISTORY))
        why = (f"a bag reads each behaviour's latest {SCALE_HISTORY} items, so no heavy user sets a step's cost "
               f"({large})" if big_bags else
               f"rows are streamed, so every user's bags are built once from the cache and held in memory, each "
               f"behaviour's latest {SCALE_HISTORY} items: at most {8 * SCALE_HISTORY + 4:,} bytes a user and "
               "behaviour (csmf.data.stream_history)")  # fmt: skip
        notes.append(f"model.history_max = {SCALE_HISTORY}: {why}")
    if big and cascade and m.encoder == "graph" and cfg.train.weight_decay == 0 and "train.weight_decay" not in pinned:
        cfg = replace(cfg, train=replace(cfg.train, weight_decay=SCALE_WEIGHT_DECAY))
        notes.append(f"train.weight_decay = {SCALE_WEIGHT_DECAY}: each step shrinks the trained columns by lr x "
                     f"{SCALE_WEIGHT_DECAY}, since an item seen a few times is otherwise fit to its own users and "
                     f"validation falls from the first steps ({large})")  # fmt: skip
    if big and cascade and not cfg.train.stream:  # the in-memory cascade, either encoder
        cfg, schedule = _scale_schedule(cfg, pinned, large)
        notes += schedule
    t = cfg.train
    short = math.ceil(SCALE_LIST_DECAYS * t.distill_decay)
    if big and cascade and t.distill and t.distill_top > short and "train.distill_top" not in pinned:
        cfg = replace(cfg, train=replace(t, distill_top=short))
        notes.append(f"train.distill_top = {short}: the teacher's list past rank {SCALE_LIST_DECAYS} x "
                     f"train.distill_decay holds {math.exp(-SCALE_LIST_DECAYS):.1%} of its weight, and each listed "
                     f"item is scored with its neighbours in every step ({large})")  # fmt: skip
    cfg, note = sample_validation(cfg, n_items, pinned)
    return cfg, notes + note


def _scale_schedule(cfg: Config, pinned: set[str], large: str) -> tuple[Config, list[str]]:
    """The in-memory cascade's bounded schedule past SCALE_ITEMS (keys the user set are kept), and its notes."""
    t, c, notes = cfg.train, cfg.cascade, []
    if t.patience > SCALE_PATIENCE and "train.patience" not in pinned:
        t = replace(t, patience=SCALE_PATIENCE)
        notes.append(f"train.patience = {SCALE_PATIENCE}: a stage stops at its first epoch without a validation gain, "
                     f"since an epoch takes minutes ({large})")  # fmt: skip
    if max(t.max_epochs) > SCALE_EPOCHS and "train.max_epochs" not in pinned:
        t = replace(t, max_epochs=tuple(min(e, SCALE_EPOCHS) for e in t.max_epochs))
        notes.append(f"train.max_epochs = {SCALE_EPOCHS}: at most {SCALE_EPOCHS} epochs a stage ({large})")
    if c.recover_frac > 0 and c.recover_skip == 0 and "cascade.recover_skip" not in pinned:
        c = replace(c, recover_skip=SCALE_RECOVER_SKIP)
        notes.append(f"cascade.recover_skip = {SCALE_RECOVER_SKIP}: AR runs only where pruning cost more than "
                     f"{SCALE_RECOVER_SKIP:.0%} of the stage's validation, since it costs a pass over the users "
                     f"({large})")  # fmt: skip
    if c.recover_frac > SCALE_RECOVER_FRAC and "cascade.recover_frac" not in pinned:
        share = f"{SCALE_RECOVER_FRAC:.0%} of the stage's pairs (was {c.recover_frac:g})"
        notes.append(f"cascade.recover_frac = {SCALE_RECOVER_FRAC}: AR re-trains on {share}, since a pass over them "
                     f"costs minutes ({large})")  # fmt: skip
        c = replace(c, recover_frac=SCALE_RECOVER_FRAC)
    return replace(cfg, train=t, cascade=c), notes


def sample_validation(cfg: Config, n_items: int | None, pinned: Iterable[str]) -> tuple[Config, list[str]]:
    """Past SCALE_ITEMS validation ranks a seeded sample of `eval.valid_users` users (unless the key is pinned),
    and the note that says so: `fit_to_size` for training, `csmf bench` for every model's tuning."""
    if n_items is None or n_items <= SCALE_ITEMS or cfg.eval.valid_users or "eval.valid_users" in pinned:
        return cfg, []
    note = (f"eval.valid_users = {SCALE_VALID_USERS:,}: validation ranks a seeded sample of users against the whole "
            f"catalogue, the test every user ({n_items:,} items are above {SCALE_ITEMS:,})")  # fmt: skip
    return replace(cfg, eval=replace(cfg.eval, valid_users=SCALE_VALID_USERS)), [note]


# past SCALE_ITEMS a baseline's search stops after this many fits per objective: one ALS fit and its validation took
# about a minute on the 2.2M-row simulator, and the full coordinate search (>= 10 fits an objective) ran past an hour
SCALE_TUNE_FITS = 4


def cap_tuning(cfg: Config, n_items: int | None, pinned: Iterable[str]) -> tuple[Config, list[str]]:
    """Past SCALE_ITEMS the baselines' searches stop after SCALE_TUNE_FITS fits per objective (unless
    bench.tune_max_fits is pinned or set), and the note that says so."""
    b = cfg.bench
    if n_items is None or n_items <= SCALE_ITEMS or b.tune_max_fits or "bench.tune_max_fits" in pinned:
        return cfg, []
    note = (
        f"bench.tune_max_fits = {SCALE_TUNE_FITS}: each baseline's search (ALS, item-kNN, EASE) stops after "
        f"{SCALE_TUNE_FITS} fits an objective, in its fixed order ({n_items:,} items are above {SCALE_ITEMS:,})"
    )
    return replace(cfg, bench=replace(b, tune_max_fits=SCALE_TUNE_FITS)), [note]


# EASE holds a few dense N x N float32 matrices while it solves (Gram, factor, weights: ~12 N^2 bytes, 7.5 GB at
# 25k items); past this catalogue the teacher is item-kNN, sparse and seconds (docs/method.md, teachers)
EASE_TEACHER_MAX_ITEMS = 25_000


def teacher_kind(cfg: Config, n_items: int) -> str:
    """The distillation teacher that fits: `train.distill`, or item-kNN where an EASE teacher would not fit."""
    kind = cfg.train.distill
    return "itemknn" if kind == "ease" and n_items > EASE_TEACHER_MAX_ITEMS else kind


def _stream_problems(cfg: Config, streaming: bool | None) -> list[str]:
    """train.stream reads training rows from the cache in batches: an encoder that needs every user's pairs in
    memory at once is refused (--config stream sets one that does not). History bags read each user's latest
    model.history_max items, built once from the cache (csmf.data.stream_history), and train.aux_weight streams the
    other stages' rows (Cache.weighted_batches); a teacher is refused by training_problems (it needs the per-user
    loss)."""
    m = cfg.model
    out = []
    if not (cfg.data.cache_dir if streaming is None else streaming):
        out.append("data.cache_dir is not set (the rows are streamed from the cache)")
    if not BACKBONES[m.encoder].can_stream(m):
        usable = [name for name, b in BACKBONES.items() if b.can_stream(m)]
        out.append(f"model.encoder = {m.encoder!r} builds its graph from every user's training rows in memory; use "
                   f"model.encoder = {usable[0]!r}")  # fmt: skip
    return ["train.stream: " + "; ".join(out) + "; --config stream sets these"] if out else []


def check_training(cfg: Config, n_items: int | None = None, streaming: bool | None = None,
                   device: str | None = None, cascade: bool = True) -> None:  # fmt: skip
    """Raise one ConfigError listing every problem `training_problems` finds."""
    problems = training_problems(cfg, n_items, streaming, device, cascade)
    if problems:
        raise ConfigError("this configuration cannot train: " + " | ".join(problems))
