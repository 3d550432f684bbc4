"""Choosing CSMF's configuration on validation (csmf.selection): which candidates a user's pins leave, that the
pick is the best validation value and reads no test pair, the time budget, and a stored pick reused."""

from __future__ import annotations

import json
import time

import pytest
import scipy.sparse as sp

from csmf.cli import main
from csmf.config import Config, ConfigError, load_config, override
from csmf.data.logtable import load_log
from csmf.data.split import split_log
from csmf.models.itemknn import ItemKNN, ItemKNNSettings
from csmf.models.popularity import Popularity
from csmf.rules import SCALE_VALID_USERS, fit_to_size
from csmf.selection import candidates, pins, select, validation_score

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(sim_parquet, one_thread):
    return split_log(load_log(sim_parquet[0]), test_frac=0.2, valid_frac=0.1, seed=0, by="random", name="sim")


def names(cfg: Config, named=()) -> list[str]:
    return [c.name for c in candidates(cfg, pins(cfg, named))]


def test_pins_leave_only_the_candidates_they_agree_with():
    assert names(override(Config(), ["data.dataset=sim"])) == ["graph", "mlp", "graph model.graph_hops=1"]
    assert names(load_config("mlp")) == ["mlp"]  # --config mlp pins every key of the preset
    graphs = ["graph", "graph model.graph_hops=1"]
    assert names(override(Config(), ["model.encoder=graph"]), ["model.encoder"]) == graphs  # pinned at default
    assert names(override(Config(), ["model.dim=8"])) == graphs  # the mlp preset sets model.dim = 64
    assert names(override(Config(), ["model.graph_hops=2"]), ["model.graph_hops"]) == ["graph", "mlp"]
    hops = override(Config(), ["select.candidates=graph,graph model.graph_hops=1,mlp", "model.feature_dim=8"])
    found = candidates(hops, pins(hops))
    assert [c.name for c in found] == ["graph", "graph model.graph_hops=1", "mlp"]
    assert [c.cfg.model.graph_hops for c in found[:2]] == [2, 1] and all(c.cfg.model.feature_dim == 8 for c in found)
    # a pin against every candidate: the user's own configuration is the one candidate
    only = override(Config(), ["select.candidates=mlp", "model.encoder=graph"])
    assert [(c.name, c.cfg) for c in candidates(only, pins(only, ["model.encoder"]))] == [("as configured", only)]
    # two spellings of one configuration count once
    same = override(Config(), ["select.candidates=graph,graph model.graph_hops=2"])
    assert names(same) == ["graph"]


def test_every_candidate_keeps_the_runs_data_evaluation_and_search_settings_a_rule_set():
    """csmf bench caps the baselines' tuning and samples validation past 100,000 items without the user setting it;
    the pick's configuration goes on to the baselines, so every candidate keeps those values (it lost them: ALS then
    ran 16-20 fits an objective on a 118k-item log, under a log line that said 4)."""
    from csmf.rules import cap_tuning, sample_validation

    cfg = Config()
    cfg, _ = cap_tuning(cfg, 150_000, {})
    cfg, _ = sample_validation(cfg, 150_000, {})
    assert cfg.bench.tune_max_fits == 4 and cfg.eval.valid_users == SCALE_VALID_USERS
    found = candidates(cfg, pins(Config()))
    assert len(found) == 3 and {c.cfg.model.encoder for c in found} == {"graph", "mlp"}
    for c in found:
        assert (c.cfg.bench.tune_max_fits, c.cfg.eval.valid_users) == (4, SCALE_VALID_USERS), c.name
        assert c.cfg.select == cfg.select and c.cfg.data == cfg.data


def test_a_candidate_that_is_not_a_model_setting_is_refused():
    with pytest.raises(ConfigError, match="'nosuch'"):
        names(override(Config(), ["select.candidates=nosuch"]))
    with pytest.raises(ConfigError, match="sets \\['data.dataset'\\]"):
        names(override(Config(), ["select.candidates=graph data.dataset=sim"]))
    with pytest.raises(ConfigError, match="select.candidates"):
        override(Config(), ["select.candidates=model.dim=8"])  # settings without a preset first


def _fit(data, calls):
    """Stand-ins for two encoders: the 'mlp' candidate is item-kNN, the graph one popularity."""

    def fit(cfg: Config, tag: str):
        calls.append((cfg.model.encoder, tag))
        if cfg.model.encoder == "mlp":
            return ItemKNN({s: ItemKNNSettings("cosine", 50, 0.0, 1.2, 0.75) for s in data.stages}).fit(data)
        return Popularity().fit(data)

    return fit


def test_the_pick_is_the_best_mean_validation_value_and_reads_no_test_pair(data, tmp_path):
    cfg = override(Config(), [f"select.store_dir={tmp_path}", "select.candidates=graph,mlp"])
    calls = []
    model, chosen, record = select(cfg, data, _fit(data, calls), log=lambda _m: None)
    assert calls == [("graph", "graph"), ("mlp", "mlp")] and record["pick"] == "mlp" == chosen.model.encoder
    assert isinstance(model, ItemKNN) and not record["skipped"] and record["reused"] is None
    means = {t["candidate"]: t["mean"] for t in record["trials"]}
    assert means["mlp"] > means["graph"]
    assert record["trials"][1]["values"] == validation_score(model, data, cfg)
    # the test pairs replaced by nothing: the same values, the same pick (selection reads validation only)
    blind = data.__class__(**{**data.__dict__, "test": {s: sp.csr_matrix(m.shape) for s, m in data.test.items()}})
    _, _, again = select(override(cfg, ["select.reuse=false"]), blind, _fit(blind, []), log=lambda _m: None)
    assert [t["values"] for t in again["trials"]] == [t["values"] for t in record["trials"]]
    # a second run on the same data trains the stored pick alone, and says so
    calls, said = [], []
    model, chosen, reused = select(cfg, data, _fit(data, calls), log=said.append)
    assert calls == [("mlp", "")] and reused["pick"] == "mlp" and reused["reused"].endswith(".json")
    assert "chosen on validation by an earlier run" in said[0]
    stored = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert stored["pick"] == "mlp" and len(stored["trials"]) == 2
    # a caller that needs only the config (no CSMF row) gets the stored pick without a fit
    calls = []
    model, chosen, reused = select(cfg, data, _fit(data, calls), log=lambda _m: None, fit_stored=False)
    assert model is None and calls == [] and reused["pick"] == "mlp" and chosen.model.encoder == "mlp"


def test_a_shipped_pick_serves_when_the_users_cache_has_none(data, tmp_path, monkeypatch):
    import csmf.selection as selection

    cfg = override(Config(), [f"select.store_dir={tmp_path / 'mine'}", "select.candidates=graph,mlp"])
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    name = selection.store_path(cfg, data, candidates(cfg, pins(cfg))).name
    (shipped / name).write_text(json.dumps({"pick": "graph", "trials": [{"candidate": "graph", "mean": 0.1}]}))
    monkeypatch.setattr(selection, "SHIPPED", shipped)
    calls, said = [], []
    _, chosen, record = select(cfg, data, _fit(data, calls), log=said.append)
    assert calls == [("graph", "")] and chosen.model.encoder == "graph" and "shipped with csmf" in said[0]
    assert record["reused"] == str(shipped / name)
    calls = []  # the user's own pick comes first
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / name).write_text(json.dumps({"pick": "mlp", "trials": []}))
    _, chosen, _ = select(cfg, data, _fit(data, calls), log=lambda _m: None)
    assert chosen.model.encoder == "mlp" and calls == [("mlp", "")]


def test_the_pick_shipped_for_jd_matches_the_default_candidates():
    """The README's main job finds its shipped pick only while the key (JD's fingerprint and the candidates'
    settings) is current: a change of defaults must rerun `csmf train --dataset jd` and ship its pick again."""
    from csmf.data.datasets import load_dataset
    from csmf.selection import SHIPPED, store_path

    cfg = Config()
    jd = load_dataset(cfg)
    shipped = SHIPPED / store_path(cfg, jd, candidates(cfg, pins(cfg))).name
    assert shipped.exists(), "no shipped JD pick for the current defaults: rerun the main job and copy its pick"
    stored = json.loads(shipped.read_text())
    assert stored["pick"] in cfg.select.candidates and len(stored["trials"]) == len(cfg.select.candidates)


def test_the_pick_key_holds_what_the_candidates_fits_read(data):
    """A setting CSMF's fit reads (its own, or a teacher's) makes another key; the multi-task baselines' do not."""
    from csmf.selection import store_path

    def key(*sets):
        cfg = override(Config(), ["select.candidates=graph,mlp", *sets])
        return store_path(cfg, data, candidates(cfg, pins(cfg))).name

    base = key()
    assert key("multitask.lr=0.01", "multitask.patience=3") == base
    assert key("train.lr=0.02") != base and key("ease.l2=50") != base and key("cascade.tau=0.2") != base


def test_each_candidate_is_scored_with_the_configuration_its_fit_adapted(data, tmp_path, monkeypatch):
    """Past 100,000 items a CSMF fit validates a sample of users (fit_to_size); selection scores it the same way."""
    import csmf.selection as selection

    seen = []
    monkeypatch.setattr(selection, "validation_score", lambda _m, _d, c: seen.append(c.eval.valid_users) or {"a": 0.1})
    cfg = override(Config(), [f"select.store_dir={tmp_path}", "select.candidates=graph,mlp"])
    fit = _fit(data, [])

    def adapted(c, tag):
        model = fit(c, tag)
        model.cfg = fit_to_size(c, 150_000)[0] if c.model.encoder == "graph" else c
        return model

    select(cfg, data, adapted, log=lambda _m: None)
    assert seen == [SCALE_VALID_USERS, 0]
    seen.clear()
    select(override(cfg, ["select.reuse=false"]), data, fit, log=lambda _m: None)  # no configuration: the caller's
    assert seen == [0, 0]


def test_the_budget_stops_starting_candidates(data, tmp_path):
    cfg = override(Config(), [f"select.store_dir={tmp_path}", "select.budget_s=0.001"])
    calls = []
    fit = _fit(data, calls)

    def slow(c, tag):
        time.sleep(0.01)
        return fit(c, tag)

    _, chosen, record = select(cfg, data, slow, log=lambda _m: None)
    assert calls == [("graph", "graph")] and record["pick"] == "graph"
    assert record["skipped"] == ["mlp", "graph model.graph_hops=1"]
    assert not list(tmp_path.glob("*.json"))  # a cut search is not stored as the answer


def test_csmf_train_searches_the_candidates_and_keeps_the_pick(sim_parquet, tmp_path):
    tiny = "model.dim=8 train.max_epochs=1 model.user_hidden=16 model.id_dim=8 model.history_dim=8"
    out = tmp_path / "run"
    argv = ["train", "--dataset", str(sim_parquet[0]), "--out", str(out), "--quiet",
            "--set", f"select.candidates=graph {tiny},mlp {tiny}"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "metrics.json").read_text())
    record = summary["selection"]
    assert [t["candidate"] for t in record["trials"]] == [f"graph {tiny}", f"mlp {tiny}"]
    best = max(record["trials"], key=lambda t: t["mean"])
    assert record["pick"] == best["candidate"]
    assert summary["config"]["model"]["encoder"] == best["candidate"].split()[0]
    assert load_config(out / "config.toml").model.encoder == best["candidate"].split()[0]  # what was trained
    assert (
        out / "checkpoints" / "graph_model.dim-8_train.max_epochs-1_model.user_hidden-16_model.id_dim-8_"
        "model.history_dim-8"
    ).is_dir()


def test_a_fitted_cascade_is_validated_from_the_history_it_trained_on(data):
    from csmf.models.csmf import CSMF

    cfg = override(Config(), ["model.dim=16", "train.max_epochs=2", "train.user_batch_size=64", "train.distill="])
    model = CSMF(cfg).fit(data)
    values = validation_score(model, data, cfg)
    # the trainer's own validation of each objective's last phase: the same numbers (stage k's scores do not move
    # after its phases, cascade isolation); scored from the full history the validation pairs would be found
    last = {}
    for phase in model.phases:
        if phase.get("epochs"):
            stage = int(phase["phase"].split("-")[1])
            last[data.stages[stage - 1]] = phase["epochs"][phase["best_epoch"] - 1]["valid"]["recall@50"]
    assert values == pytest.approx(last, abs=1e-5)
    leaky = {s: v for s, v in validation_score(_Plain(model), data, cfg).items()}
    assert all(leaky[s] > values[s] for s in values)


class _Plain:
    """The fitted model without its validation view: it scores from its whole history."""

    def __init__(self, model):
        self.model = model

    def score(self, users, stage):
        return self.model.score(users, stage)


def test_past_100k_items_the_user_id_mlp_is_tried_first_unless_the_candidates_are_set():
    from csmf.selection import SCALE_CANDIDATE, scale_candidates

    cfg, said = Config(), []
    assert scale_candidates(cfg, 13_465, {}, said.append) is cfg and not said  # JD-sized: the defaults as they are
    big = scale_candidates(cfg, 193_994, {}, said.append)
    assert big.select.candidates == (SCALE_CANDIDATE, *cfg.select.candidates) and "tried first" in said[0]
    assert [c.name for c in candidates(big, {})][0] == SCALE_CANDIDATE
    (first,) = [c for c in candidates(big, {}) if c.name == SCALE_CANDIDATE]
    assert first.cfg.model.encoder == "mlp" and first.cfg.model.user_id and not first.cfg.model.history
    mine = override(cfg, ["select.candidates=graph"])  # the user's own list is kept
    assert scale_candidates(mine, 193_994, pins(mine)) is mine
    off = override(cfg, ["select.candidates="])  # no search: nothing added
    assert scale_candidates(off, 193_994, pins(off)) is off


def test_a_variant_is_not_fit_when_its_preset_fell_further_behind_than_the_gap(data, tmp_path):
    listed = "select.candidates=mlp,graph,graph model.graph_hops=1,mlp model.dim=8"
    base = override(Config(), [f"select.store_dir={tmp_path}", listed, "select.reuse=false"])
    calls: list = []
    _, _, every = select(override(base, ["select.variant_gap=0"]), data, _fit(data, calls), log=lambda _m: None)
    assert len(calls) == 4 and not every["dropped"]
    means = {t["candidate"]: t["mean"] for t in every["trials"]}
    short = 1 - means["graph"] / means["mlp"]  # popularity behind item-kNN on this log
    assert short > 0.02
    calls, said = [], []
    near = override(base, [f"select.variant_gap={short - 0.01}"])
    _, chosen, record = select(near, data, _fit(data, calls), log=said.append)
    # the graph variant is dropped; the mlp variant's preset is the best, so it is fit
    assert [c[0] for c in calls] == ["mlp", "graph", "mlp"]
    assert record["dropped"] == ["graph model.graph_hops=1"] and not record["skipped"]
    assert any("'graph model.graph_hops=1' not fit" in line and "select.variant_gap" in line for line in said)
    assert record["pick"] == "mlp" and chosen.model.encoder == "mlp"
    calls = []
    far = override(base, [f"select.variant_gap={short + 0.01}"])
    _, _, record = select(far, data, _fit(data, calls), log=lambda _m: None)
    assert len(calls) == 4 and not record["dropped"]


def test_the_suite_report_names_the_variants_dropped_behind_their_preset(tmp_path):
    from csmf.experiments.report import _selection_lines

    record = {"metric": "mean validation recall@50 over the objectives", "pick": "mlp", "budget_s": 900.0,
              "skipped": [], "dropped": ["graph model.graph_hops=1"], "variant_gap": 0.25,
              "trials": [{"candidate": "mlp", "values": {"view": 0.4}, "mean": 0.4, "seconds": 3.0},
                         {"candidate": "graph", "values": {"view": 0.2}, "mean": 0.2, "seconds": 5.0}]}  # fmt: skip
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"record": record}))
    text = "\n".join(_selection_lines(path))
    assert "| `mlp` **(picked)** | view 0.4000 | 0.4000 | 3 |" in text
    assert "more than 25% below the best (`select.variant_gap`): ['graph model.graph_hops=1']" in text
    assert "Not tried within the budget" not in text
