"""The neural baselines: multi-task two-towers (shared-bottom, MMoE, PLE, MVKE-style) and the config-edit
baselines of the cascade trainer (packnet, naive-ft): shapes, the fused query each one serves, what each
costs per item, determinism, and the mechanism that defines each baseline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csmf.config import Config, override
from csmf.data.logtable import load_log
from csmf.data.split import split_log
from csmf.experiments.cost import exact_top_k, query_cost
from csmf.models.csmf import CSMF
from csmf.models.multitask import KINDS, MultiTask, MultiTaskTwoTower

CFG = override(
    Config(),
    [
        "model.id_dim=8",
        "model.history_dim=8",
        "model.dim=8",
        "multitask.expert_dim=16",
        "multitask.kernel_dim=8",
        "multitask.max_epochs=2",
        "multitask.lr=0.01",
        "multitask.patience=4",
        "train.max_epochs=2",
        "train.batch_size=256",
        "train.extra_negatives=64",
    ],
)
WEIGHTS = {"exposure": 0.2, "click": 0.5, "conversion": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(sim_parquet, one_thread):
    return split_log(load_log(sim_parquet[0]), test_frac=0.2, valid_frac=0.1, seed=0, by="random", name="sim")


@pytest.fixture(scope="module")
def fitted(data):
    return {kind: MultiTask(kind, CFG).fit(data) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_multitask_scores_every_objective(fitted, data, kind):
    model = fitted[kind]
    users = np.array([3, 0, 299])
    per = {s: model.score(users, s) for s in data.stages}
    for scores in per.values():
        assert scores.shape == (3, data.n_items) and torch.isfinite(scores).all()
    # One head per objective: the objectives rank differently.
    assert not torch.equal(per["exposure"], per["conversion"])
    with pytest.raises(KeyError, match="unknown objective"):
        model.score(users, "purchase")


@pytest.mark.parametrize("kind", KINDS)
def test_multitask_fused_query_is_the_weighted_sum_and_its_index_width_is_honest(fitted, data, kind):
    model = fitted[kind]
    users = np.arange(20)
    expected = sum(w * model.score(users, s) for s, w in WEIGHTS.items())
    torch.testing.assert_close(model.score_fused(users, WEIGHTS), expected, rtol=1e-4, atol=1e-4)
    per_item = 1 if kind == "mvke" else len(data.stages)  # mvke: shared item vector; others: concatenation
    assert model.item_vectors().shape == (data.n_items, per_item * CFG.model.dim)
    assert model.user_vectors(users, WEIGHTS).shape == (20, per_item * CFG.model.dim)
    assert model.settings()["vectors_per_item"] == per_item
    with pytest.raises(ValueError, match="all objective weights are zero"):
        model.user_vectors(users, {"click": 0.0})


def test_multitask_parameters_differ_by_design(fitted):
    params = {k: m.num_params() for k, m in fitted.items()}
    # MMoE adds experts and gates to the shared bottom; PLE adds per-objective experts to MMoE's.
    assert params["shared-bottom"] < params["mmoe"] < params["ple"]


def test_multitask_is_deterministic_for_a_seed(data, fitted):
    again = MultiTask("mmoe", CFG).fit(data)
    users = np.arange(30)
    torch.testing.assert_close(again.score(users, "click"), fitted["mmoe"].score(users, "click"), rtol=0, atol=0)


def test_mmoe_gates_are_per_objective_softmaxes(data):
    model = MultiTaskTwoTower("mmoe", data, CFG, 3)
    x = torch.randn(5, model.user_body.shared[0].in_features)
    outs = model.user_body(x)
    experts = torch.stack([torch.relu(e(x)) for e in model.user_body.shared], dim=1)  # (B, E, H)
    for t, out in enumerate(outs):
        gate = torch.softmax(model.user_body.gates[t](x), dim=1)
        torch.testing.assert_close(out, (gate.unsqueeze(2) * experts).sum(dim=1))


def test_the_multitask_lr_grows_with_the_square_root_of_a_larger_user_batch(data):
    from csmf.models.multitask import scaled_lr

    assert scaled_lr(3e-3, 64, 64) == 3e-3 and scaled_lr(3e-3, 10, 64) == 3e-3  # small logs: lr as given
    assert scaled_lr(3e-3, 256, 64) == pytest.approx(6e-3) and scaled_lr(3e-3, 256, 0) == 3e-3
    # a fit whose batches hold more than lr_batch users trains, and records, the scaled rate
    cfg = override(CFG, ["multitask.max_epochs=1", "multitask.min_steps=1", "train.user_batch_size=100",
                         "multitask.lr_batch=25"])  # fmt: skip
    model = MultiTask("shared-bottom", cfg).fit(data)
    assert model.phases[0]["lr"] == pytest.approx(cfg.multitask.lr * 2)
    unscaled = MultiTask("shared-bottom", override(cfg, ["multitask.lr_batch=0"])).fit(data)
    assert unscaled.phases[0]["lr"] == cfg.multitask.lr


def test_unknown_multitask_kind_is_refused():
    with pytest.raises(ValueError, match="unknown multi-task model"):
        MultiTask("moe", CFG)


# ----- config-edit baselines of the cascade trainer ---------------------------------------------


def test_naive_ft_serves_every_objective_with_the_final_model(data):
    model = CSMF.variant("naive-ft", CFG).fit(data)
    assert [p["phase"] for p in model.phases] == ["train-1", "train-2", "train-3"]  # no prune, no recover
    assert set(torch.unique(model.model.output_owner).tolist()) == {3}  # the last stage took every unit
    users = np.arange(10)
    torch.testing.assert_close(model.score(users, "exposure"), model.score(users, "conversion"))
    fused = model.score_fused(users, WEIGHTS)
    torch.testing.assert_close(fused, sum(WEIGHTS.values()) * model.score(users, "click"), rtol=1e-5, atol=1e-5)


def test_packnet_frees_half_of_each_stage_without_a_margin(data):
    model = CSMF.variant("packnet", CFG)
    assert model.cfg.cascade.prune == "fixed" and model.cfg.cascade.aml_m0 == 0.0
    model.fit(data)
    freed = [p["freed_share"] for p in model.phases if p["phase"] == "prune-1"][0]
    assert all(abs(share - 0.5) <= 0.07 for share in freed.values()), freed  # 8-wide groups: 4 of 8 units


# ----- cost of a fused query ---------------------------------------------------------------------


def test_exact_top_k_in_blocks_matches_one_full_topk():
    g = torch.Generator().manual_seed(0)
    queries, items = torch.randn(7, 5, generator=g), torch.randn(1000, 5, generator=g)
    scores, ids = exact_top_k(queries, items, k=20, block=64)
    full = torch.topk(queries @ items.T, k=20, dim=1)
    torch.testing.assert_close(scores, full.values)
    assert torch.equal(ids, full.indices)


def test_query_cost_counts_the_index_each_model_serves(data, fitted):
    csmf = CSMF.variant("csmf", CFG).fit(data)
    costs = {name: query_cost(m, data, data.stages, CFG.model.dim, users=16, synthetic_items=2000, repeats=1)
             for name, m in {"csmf": csmf, "mmoe": fitted["mmoe"], "mvke": fitted["mvke"]}.items()}  # fmt: skip
    d, s = CFG.model.dim, len(data.stages)
    assert costs["csmf"]["index_width"] == d and costs["csmf"]["vectors_per_item"] == 1  # weights folded in
    assert costs["mvke"]["index_width"] == d and costs["mvke"]["vectors_per_item"] == 1  # shared item vector
    assert costs["mmoe"]["index_width"] == s * d and costs["mmoe"]["vectors_per_item"] == s  # concatenation
    assert costs["mmoe"]["index_bytes_per_item"] == 4 * s * d
    for cost in costs.values():
        assert cost["query_seconds_1m"] > 0 and cost["query_ratio_catalogue"] > 0
        assert cost["params"] > 0


# ----- the MLP encoder and distillation in the multi-task towers -------------------------------------


def test_multitask_on_the_mlp_encoder_still_trains(data):
    model = MultiTask(
        "mmoe", override(CFG, ["model.encoder=mlp", "train.full_softmax_max_items=0", "train.distill="])
    ).fit(data)
    assert model.model.graph is False and model.model.item_id is not None
    assert torch.isfinite(model.score(np.arange(5), "click")).all()
    assert not model.model.graph and "table" not in dict(model.model.named_parameters())


def test_multitask_distillation_changes_the_heads_and_needs_the_full_softmax(data):
    cfg = override(CFG, ["train.max_epochs=1"])
    plain = MultiTask("shared-bottom", cfg).fit(data).score(np.arange(20), "click")
    taught = MultiTask("shared-bottom", override(cfg, ["train.distill=ease", "ease.l2=50"])).fit(data)
    assert not torch.equal(plain, taught.score(np.arange(20), "click"))
    # past the full-softmax limit the towers have no per-user loss: a default teacher is dropped, and said
    said = []
    dropped = MultiTask("mmoe", override(cfg, ["train.full_softmax_max_items=0"]), log=said.append).fit(data)
    assert dropped.cfg.train.distill == "" and "train.distill = '' (was 'ease')" in said[0]
    # a teacher set off its default is kept, and the conflict refused with its keys
    with pytest.raises(ValueError, match="train.distill = 'itemknn' needs the per-user full-catalogue loss"):
        MultiTask("mmoe", override(cfg, ["train.distill=itemknn", "train.full_softmax_max_items=0"])).fit(data)
