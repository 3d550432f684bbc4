"""The graph backbone (csmf/backbones/graph.py) and what trains over it: the tied degree-normalised bag, column
ownership through propagation (cascade isolation, exact), the per-user softmax, the cross-stage hinge,
distillation and EASE.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from csmf.backbones.features import Features
from csmf.backbones.graph import GraphBackbone, graph_weights
from csmf.cascade import CascadeTrainer
from csmf.config import Config, override
from csmf.data.logtable import load_log
from csmf.data.split import split_log
from csmf.losses import cross_stage_hinge, distillation_loss, softmax_loss, user_softmax_loss
from csmf.models.ease import EASE, EASESettings, ease_weights
from csmf.models.teachers import teacher_for, teacher_lists
from csmf.trained import TrainedCascade

CFG = override(
    Config(),
    [
        "model.encoder=graph",
        "model.dim=16",
        "model.graph_hops=2",
        "train.max_epochs=2",
        "train.user_batch_size=64",
        "train.full_softmax_max_items=100000",
        "cascade.min_share=0.125",
        "cascade.aml_form=hinge",
    ],
)
STAGES = ("exposure", "click", "conversion")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(sim_parquet, one_thread):
    return split_log(load_log(sim_parquet[0]), test_frac=0.2, valid_frac=0.1, seed=0, by="random", name="sim")


def no_features() -> Features:
    return Features({}, {}, None)


# ----- the encoder ---------------------------------------------------------------------------------


def test_graph_weights_follow_the_cascade_order():
    w = graph_weights("purchase", ("view", "purchase"), ("view", "purchase", "favorite"), 0.2, 1.0, 0.5)
    assert w == {"view": 0.2, "purchase": 1.0, "favorite": 0.5}
    w = graph_weights("view", ("view", "purchase"), ("view", "purchase", "favorite"), 0.2, 1.0, 0.0)
    assert w == {"view": 1.0, "purchase": 1.0}  # a zero weight drops the behaviour


def test_user_vector_is_the_degree_normalised_bag_of_item_rows():
    # 2 users x 3 items; hops 0: item vector = E, user = sum_j a_uj e_j / sqrt(d_u d_j)
    a = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 1]], dtype=np.float32))
    model = GraphBackbone(2, 3, 4, [{"buy": 1.0}], 0, no_features(), no_features(), seed=0)
    model.set_history({"buy": a})
    e = model.items.detach()
    d_items = np.array([1.0, 2.0, 1.0])
    expected_u0 = (e[0] / np.sqrt(2 * 1.0) + e[1] / np.sqrt(2 * 2.0)).float()
    u, v = model.vectors(np.array([0, 1]), 1)
    assert torch.allclose(u[0], expected_u0, atol=1e-6)
    assert torch.allclose(v, e)
    # an evaluation history overrides the user's row, item degrees stay the training graph's
    other = {"buy": sp.csr_matrix(np.array([[0, 0, 1], [0, 0, 0]], dtype=np.float32))}
    u_other = model.user_vectors(np.array([0, 1]), 1, history=other)
    assert torch.allclose(u_other[0], e[2] / np.sqrt(1.0 * d_items[2]), atol=1e-6)
    assert torch.equal(u_other[1], torch.zeros(4))  # no history: no vector
    # one smoothing step: item = (E + Â^T Â E) / 2
    model.hops = 1
    a_hat = np.diag(1 / np.sqrt([2.0, 2.0])) @ a.toarray() @ np.diag(1 / np.sqrt(d_items))
    smooth = (e.numpy() + a_hat.T @ a_hat @ e.numpy()) / 2
    assert np.allclose(model.item_vectors(1).detach().numpy(), smooth, atol=1e-6)


def test_user_rows_add_to_the_bag_and_are_exported_with_it():
    a = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 1]], dtype=np.float32))
    graphs = [{"buy": 1.0}, {"buy": 1.0}]
    plain = GraphBackbone(2, 3, 4, graphs, 0, no_features(), no_features(), seed=0)
    rows = GraphBackbone(2, 3, 4, graphs, 0, no_features(), no_features(), seed=0, user_id=True)
    for model in (plain, rows):
        model.set_history({"buy": a})
    assert torch.equal(plain.items, rows.items)  # the user rows are drawn last: the same item table
    (u_plain, _), (u_rows, _) = plain.vectors(np.array([0, 1]), 1), rows.vectors(np.array([0, 1]), 1)
    assert torch.allclose(u_rows, u_plain + rows.user_rows, atol=1e-7)
    with torch.no_grad():
        rows.owner[2:] = 2  # columns 2, 3 belong to stage 2: a stage-1 user vector has no user row there
    u_1 = rows.user_vectors(np.array([0]), 1)
    assert torch.equal(u_1[0, 2:], torch.zeros(2))
    (_, arrays), _ = rows.export_towers(2, [], [])
    assert np.allclose(arrays["user_side"], rows.user_rows.detach().numpy())  # the online tower adds it


def test_columns_of_other_stages_do_not_move_a_stage_score():
    """Propagation mixes rows, never columns: changing stage 2's columns leaves stage 1's scores exact."""
    a = sp.random(20, 30, density=0.2, random_state=0, format="csr")
    a.data[:] = 1
    b = sp.random(20, 30, density=0.1, random_state=1, format="csr")
    b.data[:] = 1
    model = GraphBackbone(20, 30, 8, [{"x": 1.0, "y": 0.2}, {"y": 1.0, "x": 0.2}], 2, no_features(), no_features(), 0)
    model.set_history({"x": a, "y": b})
    model.owner.copy_(torch.tensor([1, 1, 1, 1, 1, 2, 2, 2]))
    users = np.arange(20)
    u, v = model.vectors(users, 1)
    before = (u @ v.T).detach().clone()
    with torch.no_grad():
        model.items[:, 5:] += 3.0
    u, v = model.vectors(users, 1)
    assert torch.equal(before, (u @ v.T).detach())
    u2, v2 = model.vectors(users, 2)
    assert not torch.equal(before, (u2 @ v2.T).detach())


def test_a_positives_own_share_is_what_its_item_adds_to_its_users_bag():
    """Leave-target-out: Â_k[u, i] |V_k[i]|^2 over the stages is u . v_i less the same score with item i's entry of
    each stage's bag row zeroed (the bag's normalisation kept), over two stages with their own graphs and columns."""
    a = sp.random(12, 15, density=0.3, random_state=0, format="csr")
    a.data[:] = 1
    b = sp.random(12, 15, density=0.15, random_state=1, format="csr")
    b.data[:] = 1
    model = GraphBackbone(12, 15, 6, [{"x": 1.0, "y": 0.2}, {"y": 1.0, "x": 0.2}], 1, no_features(), no_features(),
                          0, leave_target_out=True)  # fmt: skip
    model.set_history({"x": a, "y": b})
    model.owner.copy_(torch.tensor([1, 1, 1, 2, 2, 2]))
    users = np.arange(12)
    rows, items = (a + b).nonzero()
    with torch.no_grad():
        u, v = model.vectors(users, 2)
        layers = model.stage_items(2)
        share = (model.bag_self_weights(users, 2, rows, items) * v[items] ** 2).sum(1)
        for p, (r, i) in enumerate(zip(rows, items, strict=True)):
            without = torch.zeros(6)
            for k, graph in enumerate(model.graphs):
                bag = graph.user_rows_sp(users[[r]], model.history, model.recent).toarray()
                bag[0, i] = 0.0
                without += torch.from_numpy(bag[0]).float() @ layers[k]
            assert torch.isclose(share[p], u[r] @ v[i] - without @ v[i], atol=1e-5)
    assert len(rows) > 20 and float(share.min()) > 0
    off = GraphBackbone(12, 15, 6, [{"x": 1.0}], 1, no_features(), no_features(), 0)
    assert off.bag_self_weights(users, 1, rows, items) is None  # the default: LightGCN's form


# ----- a 3-stage cascade over the graph encoder -------------------------------------------------------


@pytest.fixture(scope="module", params=[(False, 0), (True, 0), (False, 6)],
                ids=["bag", "bag+user-rows", "bag+neighbour-operator"])  # fmt: skip
def staged(data, request):
    user_id, neighbours = request.param
    cfg = override(CFG, [f"model.user_id={str(user_id).lower()}", f"model.graph_neighbours={neighbours}"])
    if neighbours:  # the scale path's settings: its masks must hold as well
        cfg = override(cfg, ["train.weight_decay=0.5", "model.graph_leave_target_out=true"])
    tr = CascadeTrainer(data, cfg, teacher=teacher_for(cfg))
    assert tr.per_user and isinstance(tr.model, GraphBackbone) and tr.model.per_user_loss
    assert (tr.model.user_rows is not None) == user_id
    assert all((g.operator is not None) == (neighbours > 0) for g in tr.model.graphs)
    s = {"trainer": tr}
    history = data.train | data.side
    tr.run_phase(0)
    s["prune_1"] = tr.run_phase(1)
    s["owner_1"] = tr.model.owner.clone()
    tr.run_phase(2)
    s["before_2"] = {k: v.clone() for k, v in tr.model.state_dict().items()}
    s["scores_1"] = TrainedCascade(copy.deepcopy(tr.model), STAGES, history, 1).score(
        np.arange(data.n_users), "exposure"
    )
    for index in (3, 4, 5, 6):  # train-2, prune-2, recover-2, train-3
        tr.run_phase(index)
    s["after"] = {k: v.clone() for k, v in tr.model.state_dict().items()}
    s["scores_1_after"] = TrainedCascade(tr.model, STAGES, history, 3).score(np.arange(data.n_users), "exposure")
    return s


def test_weight_decay_shrinks_only_what_the_stage_trains(staged):
    tr = staged["trainer"]
    owner = tr.model.owner
    factors = {id(p): f for p, f in tr._decay(2, 0.1)}
    items = factors[id(tr.model.items)]  # (N, D)
    assert torch.equal(items[:, owner == 2], torch.full_like(items[:, owner == 2], 0.9))
    assert torch.equal(items[:, owner != 2], torch.ones_like(items[:, owner != 2]))
    assert tr._decay(2, 0.0) == []


def test_min_share_gives_each_later_stage_its_floor(staged):
    owner = staged["after"]["owner"]
    dim = len(owner)
    # stage 1 frees at least 1/8 of D for each of the 2 stages to come; stage 3 owns at least 1/8 of D
    assert int((staged["owner_1"] == 0).sum()) >= 2 * dim // 8
    assert int((owner == 3).sum()) >= dim // 8
    assert int((owner == 2).sum()) >= 1 and int((owner == 0).sum()) == 0


def test_earlier_columns_are_bit_identical_after_later_stages(staged):
    before, after = staged["before_2"], staged["after"]
    stage_1 = after["owner"] == 1
    for key in after:
        if key == "owner":
            continue
        assert torch.equal(before[key][..., stage_1], after[key][..., stage_1]), key
        assert not torch.equal(before[key], after[key]), f"{key}: later stages trained nothing"
    assert torch.equal(staged["scores_1"], staged["scores_1_after"])


def test_graph_cascade_is_deterministic(data):
    cfg = override(CFG, ["train.max_epochs=1"])
    a = CascadeTrainer(data, cfg, teacher=teacher_for(cfg)).run().score(np.arange(50), "conversion")
    b = CascadeTrainer(data, cfg, teacher=teacher_for(cfg)).run().score(np.arange(50), "conversion")
    assert torch.equal(a, b)


# ----- losses --------------------------------------------------------------------------------------


def test_user_softmax_equals_the_per_pair_full_softmax():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 7, generator=g)
    rows, cols = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([1, 4, 0, 2, 3, 6])
    weight = torch.tensor([1.0, 0.2, 1.0, 1.0, 0.2, 0.2])
    margin = torch.tensor([0.0, 0.5, 1.0, 0.3, 0.0, 2.0])
    per_pair = softmax_loss(scores[rows], cols, 0.1, weight=weight)
    assert torch.allclose(user_softmax_loss(scores, rows, cols, weight, 0.1), per_pair, atol=1e-5)
    per_pair_m = softmax_loss(scores[rows], cols, 0.1, margin=margin, weight=weight)
    assert torch.allclose(user_softmax_loss(scores, rows, cols, weight, 0.1, margin=margin), per_pair_m, atol=1e-5)


def test_cross_stage_hinge_hand_case():
    scores = torch.tensor([[0.5, 0.2, 0.0]])
    upstream = torch.tensor([[0.0, 0.1, 0.0]])
    # positive 0 vs upstream-only 1: margin = m0 * sigmoid((0.1 - 0.0) / 1) ; gap = 0.3
    m = 2.0 * torch.sigmoid(torch.tensor(0.1))
    got = cross_stage_hinge(scores, upstream, torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), 2.0, 1.0)
    assert torch.allclose(got, torch.relu(m - 0.3))
    # a positive already far above: no loss
    far = cross_stage_hinge(scores * 100, upstream, torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), 2.0, 1.0)
    assert float(far) == 0.0


def _sparse(dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
    rows, cols = torch.nonzero(dense, as_tuple=True)
    return rows, cols, dense[rows, cols]


def test_distillation_masks_seen_items_and_matches_cross_entropy():
    scores = torch.tensor([[1.0, 2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    seen = torch.tensor([[False, True, False, False], [False, False, False, False]])
    teacher = torch.tensor([[0.75, 0.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])  # user 2: nothing taught
    log_p = F.log_softmax(torch.tensor([1.0, 0.5, 0.0]), dim=0)  # seen item 1 dropped from the softmax
    expected = -(0.75 * log_p[0] + 0.25 * log_p[1])
    assert torch.allclose(distillation_loss(scores, _sparse(seen)[:2], _sparse(teacher), 1.0), expected)


def test_sparse_distillation_equals_the_dense_cross_entropy_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 30, generator=g)
    seen = torch.rand(6, 30, generator=g) < 0.3
    seen[5] = True  # a user who has every item: no list, and no NaN from its empty softmax
    teacher = torch.rand(6, 30, generator=g) * (torch.rand(6, 30, generator=g) < 0.2) * ~seen
    teacher[2] = 0.0  # a user with history but no list
    teacher = teacher / teacher.sum(dim=1, keepdim=True).clamp_min(1e-12)
    ours = scores.clone().requires_grad_()
    distillation_loss(ours, _sparse(seen)[:2], _sparse(teacher), 0.5).backward()
    dense = scores.clone().requires_grad_()
    log_p = torch.log_softmax((dense / 0.5).masked_fill(seen, float("-inf")), dim=1)
    taught = teacher.sum(dim=1) > 0
    (-(teacher * log_p.masked_fill(seen, 0.0)).sum(dim=1))[taught].mean().backward()
    assert torch.isfinite(ours.grad).all() and ours.grad.abs().sum() > 0
    torch.testing.assert_close(ours.grad, dense.grad)


# ----- EASE and the teacher ------------------------------------------------------------------------


@pytest.mark.parametrize("untouched", [(), (0, 5)])
def test_ease_matches_the_closed_form(untouched):
    x = sp.random(40, 12, density=0.3, random_state=3, format="lil", dtype=np.float32)
    x[:, list(untouched)] = 0  # items nobody touched: solved apart, their weights exactly 0
    x = sp.csr_matrix(x)
    x.eliminate_zeros()
    x.data[:] = 1
    b = ease_weights(x, 5.0).numpy()
    g = (x.T @ x).toarray().astype(np.float64) + 5.0 * np.eye(12)
    p = np.linalg.inv(g)
    expected = -p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    assert np.allclose(b, expected, atol=1e-4)
    assert np.all(np.diag(b) == 0)
    assert np.all(b[list(untouched)] == 0) and np.all(b[:, list(untouched)] == 0)


def test_ease_and_teacher_lists_on_the_simulator(data):
    model = EASE({"click": EASESettings(l2=50.0, aux_weight=0.2)}).fit(data)
    assert model.score(np.arange(5), "click").shape == (5, data.n_items)
    cfg = override(CFG, ["train.distill=ease", "train.distill_top=10", "ease.l2=50"])
    lists = teacher_lists(data, "click", cfg)
    seen = data.excluded("click")
    sums = np.asarray(lists.sum(axis=1)).ravel()
    has_history = np.diff(seen.indptr) > 0
    assert np.allclose(sums[has_history], 1.0, atol=1e-5) and np.all(sums[~has_history] == 0)
    assert lists.multiply(seen).nnz == 0  # never teaches an item the user already has
    user = int(np.flatnonzero(has_history)[0])
    row = lists[user].toarray().ravel()
    scores = model.score(np.array([user]), "click").numpy().ravel()
    scores[seen[user].indices] = -np.inf
    assert np.count_nonzero(row) == 10 and int(np.argmax(row)) == int(np.argmax(scores))


def test_a_sparse_teachers_lists_hold_its_top_scored_unseen_items_by_rank():
    from types import SimpleNamespace

    from csmf.models.teachers import _sparse_teacher_lists

    scores = sp.csr_matrix(np.array([[0.0, 0.9, 0.5, 0.5, 0.2], [0.3, 0.0, 0.0, 0.0, 0.0], [0.0] * 5], np.float32))
    teacher = SimpleNamespace(score_sparse=lambda users, _objective: scores[users])
    seen = sp.csr_matrix(np.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], np.float32))
    decay = np.exp(-np.arange(2) / 1.0).astype(np.float32)  # top 2, weights 1 and e^-1
    data = SimpleNamespace(n_users=3, n_items=5)
    lists = _sparse_teacher_lists(teacher, data, "click", np.array([0, 1, 2]), seen, decay, batch=2)
    first = 1 / (1 + np.exp(-1))
    # user 0: item 1 is seen; items 2 and 3 tie at 0.5 (the lower column first); item 4 is past the top 2
    assert np.allclose(lists.toarray(), [[0, 0, first, 1 - first, 0], [1, 0, 0, 0, 0], [0] * 5])
    assert lists.dtype == np.float32  # user 1: one scored item, the whole weight; user 2: nothing scored


def test_teacher_lists_are_read_back_from_disk_and_refit_when_damaged(data, monkeypatch, tmp_path):
    import csmf.models.teachers as teachers

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(teachers, "_CACHE", {})
    cfg = override(CFG, ["train.distill=itemknn", "train.distill_top=5"])
    fits = []
    real_fit = teachers.fit_teacher
    monkeypatch.setattr(teachers, "fit_teacher", lambda *a: fits.append(a[1]) or real_fit(*a))
    first = teacher_lists(data, "click", cfg)
    (stored,) = (tmp_path / "csmf" / "teachers").glob("*.npz")
    teachers._CACHE.clear()  # a new process: only the disk remains
    again = teacher_lists(data, "click", cfg)
    assert fits == ["click"] and (first != again).nnz == 0 and again.dtype == np.float32
    stored.write_bytes(stored.read_bytes()[:100])  # a cut file is not trusted: the teacher is fit again
    teachers._CACHE.clear()
    assert (teacher_lists(data, "click", cfg) != first).nnz == 0 and fits == ["click", "click"]
    teachers._CACHE.clear()
    teacher_lists(data, "click", override(cfg, ["train.teacher_cache=false"]))  # off: neither read nor written
    assert fits == ["click", "click", "click"]


def test_distillation_trains_and_changes_the_student(data):
    base = override(CFG, ["train.max_epochs=1", "cascade.prune=none"])
    plain = (
        CascadeTrainer(data, base, objectives=("click",), teacher=teacher_for(base)).run().score(np.arange(30), "click")
    )
    distilled = override(base, ["train.distill=ease", "ease.l2=50"])
    taught = CascadeTrainer(data, distilled, objectives=("click",), teacher=teacher_for(distilled))
    assert not torch.equal(plain, taught.run().score(np.arange(30), "click"))


# ----- the weight sweep, presets -------------------------------------------------------------------


def test_weight_sweep_moves_from_one_objective_to_the_other(data):
    from csmf.experiments.sweep import mean_sweeps, weight_sweep
    from csmf.models.csmf import CSMF

    model = CSMF(override(CFG, ["train.max_epochs=1"])).fit(data)
    sweep = weight_sweep(model, data, data.stages, points=5)
    assert [tuple(e["pair"]) for e in sweep] == [
        ("exposure", "click"),
        ("exposure", "conversion"),
        ("click", "conversion"),
    ]
    entry = sweep[2]
    assert entry["weights"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # the end points are the single objectives' own rankings
    from csmf.evaluation import evaluate_stage

    own = evaluate_stage(model, data, "conversion", (50,))["recall@50"]
    assert abs(entry["recall"]["conversion"][-1] - round(own, 5)) < 1e-6
    assert 0.0 <= entry["overlap"] <= 1.0
    assert mean_sweeps([sweep, sweep]) == sweep
    # past bench.sweep_max_scores a seeded sample of each objective's test users is swept, and said
    users = {s: len(np.unique(data.test[s].nonzero()[0])) for s in data.stages}
    assert entry["users"] == users
    cap = 10 * data.n_items
    sampled = weight_sweep(model, data, data.stages, points=5, max_scores=cap, seed=3)
    assert sampled[2]["users"] == {s: min(n, 10) for s, n in users.items()}
    assert sampled == weight_sweep(model, data, data.stages, points=5, max_scores=cap, seed=3)
    assert sampled[2]["recall"] != entry["recall"]


def test_mlp_preset_loads_and_unknown_names_fail():
    from csmf.config import ConfigError, load_config, presets

    assert "mlp" in presets()
    cfg = load_config("mlp")
    assert cfg.model.encoder == "mlp" and cfg.train.full_softmax_max_items == 0 and cfg.model.dim == 64
    with pytest.raises(ConfigError, match="not a preset"):
        load_config("no-such-preset")


def test_distillation_refuses_the_in_batch_loss_and_takes_the_pooled_one(data):
    from csmf.config import ConfigError

    pairs = override(CFG, ["model.encoder=mlp", "train.distill=ease", "train.full_softmax_max_items=0"])
    with pytest.raises(ConfigError, match="train.distill = 'ease' needs the per-user full-catalogue loss"):
        CascadeTrainer(data, pairs, teacher=teacher_for(pairs))
    # the graph encoder past its limit keeps a per-user loss (over a pool): the teacher trains it
    pooled = override(CFG, ["train.distill=ease", "train.full_softmax_max_items=10"])
    trainer = CascadeTrainer(data, pooled, teacher=teacher_for(pooled))
    assert trainer.per_user and not trainer.full_softmax


def test_share_above_counts_the_candidates_ranked_above_the_positive():
    from csmf.losses import share_above

    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([2, 0, 1])
    every = torch.arange(5)
    assert torch.equal(share_above(scores, rows, cols, every), torch.tensor([1 / 5, 0.0, 3 / 5]))  # ties not above
    shuffled = torch.tensor([2, 0, 1])  # positives in any row order
    assert torch.equal(share_above(scores, rows[shuffled], cols[shuffled], every), torch.tensor([3 / 5, 1 / 5, 0.0]))
    g = torch.Generator().manual_seed(1)
    many = torch.randint(0, 4, (40,), generator=g).float().reshape(4, 10)  # many ties
    r, c = torch.randint(0, 4, (25,), generator=g), torch.randint(0, 10, (25,), generator=g)
    pool = torch.tensor([1, 3, 3, 8])
    direct = (many[:, pool][r] > many[r, c].unsqueeze(1)).float().mean(dim=1)
    assert torch.equal(share_above(many, r, c, pool), direct)
    some = torch.tensor([0, 4])
    assert torch.equal(share_above(scores, rows, cols, some), torch.tensor([0.5, 0.0, 0.5]))


def test_frozen_stage_cache_changes_no_number(data, monkeypatch):
    """Smoothing the frozen stages once per phase gives the same weights as smoothing them every step."""
    cfg = override(CFG, ["train.max_epochs=1", "train.distill="])
    cached = CascadeTrainer(data, cfg, teacher=teacher_for(cfg)).run().score(np.arange(40), "conversion")
    monkeypatch.setattr(GraphBackbone, "freeze_below", lambda self, stage: None)
    fresh = CascadeTrainer(data, cfg, teacher=teacher_for(cfg)).run().score(np.arange(40), "conversion")
    assert torch.equal(cached, fresh)


def test_smoothing_and_its_gradients_match_torch_sparse_backward():
    import scipy.sparse as sp

    from csmf.backbones.graph import StageGraph

    rng = np.random.default_rng(3)
    mats = {"view": sp.random(60, 40, density=0.1, format="csr", random_state=1, dtype=np.float32)}
    mats["view"].data[:] = 1.0
    graph = StageGraph({"view": 1.0}, mats, 40)
    x = torch.from_numpy(rng.standard_normal((40, 8)).astype(np.float32))
    grad = torch.from_numpy(rng.standard_normal((40, 8)).astype(np.float32))
    ours = x.clone().requires_grad_()
    graph.smooth(ours, 2).backward(grad)
    theirs, total, layer = x.clone().requires_grad_(), None, None
    total = layer = theirs
    forward_op, backward_op = graph.forward_op.to_sparse_coo(), graph.backward_op.to_sparse_coo()
    for _ in range(2):  # the same smoothing with torch's own sparse (COO) product and backward
        layer = torch.sparse.mm(backward_op, torch.sparse.mm(forward_op, layer))
        total = total + layer
    (total / 3).backward(grad)
    # CSR and COO products may round differently (fused multiply-adds at narrow widths): equal to float precision
    torch.testing.assert_close(graph.smooth(x, 2), (total / 3).detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours.grad, torch.zeros_like(ours.grad))


def test_an_ease_teacher_past_its_size_becomes_item_knn(data, monkeypatch):
    import csmf.models.teachers as teachers
    import csmf.rules

    cfg = override(CFG, ["train.distill=ease", "train.distill_top=10", "train.teacher_cache=false"])
    monkeypatch.setattr(csmf.rules, "EASE_TEACHER_MAX_ITEMS", data.n_items - 1)
    fitted = []
    real_fit = teachers.fit_teacher
    monkeypatch.setattr(teachers, "fit_teacher", lambda *a: fitted.append(real_fit(*a)) or fitted[-1])
    lists = teachers.teacher_lists(data, "click", cfg)
    assert [m.name for m in fitted] == ["itemknn"] and lists.nnz > 0


# ----- the smoothing as one top-K neighbour operator (csmf.backbones.neighbours) -----------------------


def _random_graph(seed=0, users=60, items=40):
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    mats = {
        "a": sp.csr_matrix((rng.random((users, items)) < 0.1).astype(np.float64)),
        "b": sp.csr_matrix((rng.random((users, items)) < 0.05).astype(np.float64)),
    }
    return {"a": 1.0, "b": 0.5}, mats


@pytest.mark.parametrize("hops", [0, 1, 2, 3])
def test_a_neighbour_operator_with_every_neighbour_is_the_exact_smoothing(hops):
    from csmf.backbones.graph import StageGraph

    weights, mats = _random_graph()
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32))
    exact = StageGraph(weights, mats, 40).smooth(x, hops)
    full = StageGraph(weights, mats, 40, hops=hops, neighbours=40)
    torch.testing.assert_close(full.smooth(x, hops), exact, rtol=1e-5, atol=1e-6)
    # exact already at K = the longest row of the exact average (the items within `hops` steps of an item)
    dense = np.stack([StageGraph(weights, mats, 40).smooth(torch.eye(40)[:, [j]], hops).numpy().ravel()
                      for j in range(40)], axis=1)  # fmt: skip
    longest = int((np.abs(dense) > 0).sum(axis=1).max())
    tight = StageGraph(weights, mats, 40, hops=hops, neighbours=longest)
    torch.testing.assert_close(tight.smooth(x, hops), exact, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="smooths"):
        full.smooth(x, (hops + 1) % 4)


def test_a_truncated_operator_keeps_k_entries_a_row_and_the_exact_row_weight():
    from csmf.backbones.graph import StageGraph
    from csmf.backbones.neighbours import smoothing_operator, top_k_rows

    rows = top_k_rows(sp.csr_matrix(np.array([[0.1, 0.5, 0.3, 0.5], [0.0, 0.2, 0.0, 0.0]])), 2)
    assert rows.toarray().tolist() == [[0.0, 0.5, 0.0, 0.5], [0.0, 0.2, 0.0, 0.0]]  # ties: the lower column
    weights, mats = _random_graph(2)
    graph = StageGraph(weights, mats, 40)
    normalised = graph.normalise(graph.adjacency(mats))
    m = smoothing_operator(normalised, 2, 5)
    assert np.diff(m.indptr).max() <= 5
    # built in blocks of a few products (a large catalogue's memory bound), it is the same operator
    assert abs(smoothing_operator(normalised, 2, 5, max_entries=40) - m).max() == 0
    exact = graph.smooth(torch.ones(40, 1, dtype=torch.float32), 2).numpy().ravel()  # the exact row sums
    np.testing.assert_allclose(np.asarray(m.sum(axis=1)).ravel(), exact, rtol=1e-5)
    # the kept neighbours are the largest entries of the exact average: none dropped outweighs one kept
    full = smoothing_operator(normalised, 1, 40).toarray()
    one = smoothing_operator(normalised, 1, 5).toarray()
    for i in range(40):
        kept = one[i] > 0
        if kept.sum() == 5:
            assert full[i][~kept].max() <= full[i][kept].min() + 1e-12


def test_the_neighbour_operator_gradient_is_its_transpose():
    from csmf.backbones.graph import StageGraph

    weights, mats = _random_graph(3)
    graph = StageGraph(weights, mats, 40, hops=2, neighbours=6)
    x = torch.randn(40, 4, requires_grad=True)
    grad = torch.randn(40, 4)
    graph.smooth(x, 2).backward(grad)
    m = graph.operator[0].to_dense()
    torch.testing.assert_close(x.grad, m.T @ grad, rtol=1e-5, atol=1e-6)


def test_per_batch_vectors_equal_the_whole_catalogue_ones_and_train_the_same_columns():
    """With neighbour operators a batch's user and item vectors read only the rows near it; they equal the
    whole-catalogue computation (to float precision), frozen earlier stages included, and so do the gradients."""
    weights, mats = _random_graph(4, users=50, items=30)
    graphs = [weights, {"b": 1.0, "a": 0.2}]
    model = GraphBackbone(50, 30, 8, graphs, 2, no_features(), no_features(), 0, neighbours=5)
    model.set_history(mats)
    assert model.per_batch()
    model.owner[4:] = 2  # stage 1 owns columns 0-3, stage 2 columns 4-7
    users, items = np.array([3, 7, 7, 20]), torch.tensor([0, 5, 29, 5])
    with model.training_stage(2):
        batch_u = model.user_vectors(users, 2)
        batch_v = model.item_vectors(2, items)
        whole_u, whole_v = model.vectors(users, 2)
        torch.testing.assert_close(batch_u, whole_u, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch_v, whole_v[items], rtol=1e-5, atol=1e-6)
        (batch_u.sum() + batch_v.pow(2).sum()).backward()
        per_batch_grad = model.items.grad.clone()
        model.items.grad = None
        (whole_u.sum() + whole_v[items].pow(2).sum()).backward()
        torch.testing.assert_close(per_batch_grad, model.items.grad, rtol=1e-5, atol=1e-6)
    # the batch's item gradient reaches only items within the operators' rows of the batch
    touched = set(np.concatenate([g.neighbour_rows[items.numpy()].indices for g in model.graphs]))
    touched |= set(np.concatenate([(g.user_rows_sp(users, mats) @ g.neighbour_rows).indices for g in model.graphs]))
    moved = set(torch.nonzero(per_batch_grad.abs().sum(dim=1)).squeeze(1).tolist())
    assert moved <= touched and len(moved) < 30


# ----- the pooled per-user loss past the full-softmax limit (csmf.stage_loss.Pool) ---------------------


def _pool_setup(form: str, m0: float):
    from csmf.data.batches import target_matrix
    from csmf.data.schema import difference

    weights, mats = _random_graph(5, users=50, items=30)
    model = GraphBackbone(50, 30, 8, [{"b": 1.0, "a": 0.2}, weights], 2, no_features(), no_features(), 0,
                          neighbours=30)  # fmt: skip
    model.set_history(mats)
    model.owner[5:] = 2
    coo = mats["a"].tocoo()
    targets = target_matrix(coo.row.astype(np.int64), coo.col.astype(np.int64), None, 50, 30)
    rng = np.random.default_rng(0)
    teacher = sp.csr_matrix(rng.random((50, 30)) * (rng.random((50, 30)) < 0.2))
    teacher = sp.csr_matrix(sp.diags(1.0 / np.maximum(np.asarray(teacher.sum(axis=1)).ravel(), 1e-12)) @ teacher)
    extras = {"seen": mats["b"], "teacher": teacher, "upstream_only": difference(mats["b"], mats["a"])}
    cfg = override(CFG, [f"cascade.aml_form={form}", f"cascade.aml_m0={m0}"])
    return model, cfg, targets, extras


@pytest.mark.parametrize("form, m0", [("margin", 0.0), ("weight", 1.0), ("hinge", 1.0)])
def test_a_pool_holding_the_whole_catalogue_is_the_full_loss(form, m0):
    from csmf.stage_loss import UserLoss

    model, cfg, targets, extras = _pool_setup(form, m0)
    users = np.array([1, 4, 9, 17, 33])
    values, grads = [], []
    for pool in (0, 64):  # 64 >= 30 items: the pool is the catalogue, its draw weights log 1 = 0
        model.zero_grad()
        loss = UserLoss(model, 2, cfg, targets, torch.Generator().manual_seed(0), extras, pool)(users)
        loss.backward()
        values.append(loss.detach())
        grads.append(model.items.grad.clone())
    if form == "margin":  # the margin / hinge draw their samples differently; without them the two are equal
        torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert torch.isfinite(values[1]) and grads[1].abs().sum() > 0


def test_a_pool_scores_each_users_own_items_exactly_and_weights_the_shared_draw():
    from csmf.stage_loss import Pool

    own = sp.csr_matrix(([1.0] * 5, ([0, 0, 0, 1, 1], [7, 3, 11, 3, 500])), shape=(3, 1000))  # row 2 owns nothing
    pool = Pool.draw(own, 1000, 50, torch.Generator().manual_seed(1))
    assert pool.width == 3 and 40 <= len(pool.shared) <= 50  # 50 uniform draws, repeats removed
    bias = pool.bias.numpy()
    assert bias[0, :3].tolist() == [0, 0, 0] and bias[1, :2].tolist() == [0, 0] and np.isneginf(bias[1, 2])
    assert np.isneginf(bias[2, :3]).all()  # padding
    for row, owned in enumerate([{3, 7, 11}, {3, 500}, set()]):
        outside = [j for j, item in enumerate(pool.shared) if item not in owned]
        np.testing.assert_allclose(bias[row, 3 + np.array(outside)], np.log((1000 - len(owned)) / len(outside)),
                                   rtol=1e-6)  # fmt: skip
        clashes = [j for j, item in enumerate(pool.shared) if item in owned]
        assert np.isneginf(bias[row, 3 + np.array(clashes, dtype=int)]).all()
    drawn = int(pool.shared[5])
    cols, inside = pool.locate(np.array([0, 1, 1, 2, 2]), np.array([11, 3, drawn, drawn, 999 if 999 not in pool.shared
                                                                                          else 998]))  # fmt: skip
    assert inside.tolist() == [True, True, True, True, False]
    assert cols[:4].tolist() == [2, 0, 3 + 5, 3 + 5]  # own columns follow item order; shared ones after width
    # scores: a row's own columns hold u . v of its own items, the shared ones u . v of the draw
    u, v = torch.randn(3, 4), torch.randn(len(pool.items), 4)
    block = pool.scores(u, v)
    at = {int(item): i for i, item in enumerate(pool.items)}
    assert torch.allclose(block[0, 2], u[0] @ v[at[11]]) and torch.allclose(block[2, 3 + 5], u[2] @ v[at[drawn]])
    # each row's weighted draw estimates the whole catalogue's partition over the items it does not own
    scores = np.random.default_rng(2).standard_normal(1000)
    estimates = []
    for seed in range(200):
        p = Pool.draw(own, 1000, 100, torch.Generator().manual_seed(seed))
        estimates.append(np.sum(np.exp(scores[p.shared] + p.bias.numpy()[0, p.width :])))
    exact = np.exp(scores).sum() - np.exp(scores[[3, 7, 11]]).sum()
    assert abs(np.mean(estimates) / exact - 1) < 0.02


# ----- the teacher check and AR by users -------------------------------------------------------------


def test_list_recalls_hand_case():
    from types import SimpleNamespace

    from csmf.evaluation import list_recalls

    def rows(*items):
        return sp.csr_matrix(
            (np.ones(sum(map(len, items))), np.concatenate([np.array(i, int) for i in items]),
             np.cumsum([0, *map(len, items)])), shape=(3, 5),
        )  # fmt: skip

    train = rows([0], [], [0, 1])  # popularity: item 0 (2 pairs), item 1 (1), then 2, 3, 4 by id
    data = SimpleNamespace(test={"o": rows([1, 4], [0], [])}, matrix=lambda _o: train, excluded=lambda _o: train)
    lists = rows([4], [2, 3], [])
    # user 0: the list [4] finds 1 of {1, 4}; as many popular unseen items: [1] (0 is seen) finds 1 of 2
    # user 1: [2, 3] finds nothing of {0}; [0, 1] finds it; user 2 has no validation pair
    assert list_recalls(lists, data, "o") == (0.25, 0.75, 2)
    assert list_recalls(lists, data, "o", sample=1, seed=0)[2] == 1


def _missing_lists(data, objective):
    """A teacher that lists each user 5 items none of which is among its validation pairs (data is the tuning view,
    whose test side is validation): it finds nothing there."""
    valid, n = data.test[objective].tolil(), data.n_users
    rng = np.random.default_rng(0)
    cols = [rng.choice(np.setdiff1d(np.arange(data.n_items), valid.rows[u]), 5, replace=False) for u in range(n)]
    return sp.csr_matrix((np.full(5 * n, 0.2, np.float32), (np.repeat(np.arange(n), 5), np.concatenate(cols))),
                         shape=(n, data.n_items))  # fmt: skip


def test_a_teacher_under_half_of_popularity_is_dropped_and_said(data):
    cfg = override(CFG, ["train.max_epochs=1", "cascade.prune=none", "train.distill=ease"])
    said = []
    dropped = CascadeTrainer(data, cfg, objectives=("click",), teacher=_missing_lists, log=said.append)
    scores = dropped.run().score(np.arange(30), "click")
    assert any("dropped (train.distill_check = 0.5)" in line for line in said)
    none = override(cfg, ["train.distill="])
    assert torch.equal(scores, CascadeTrainer(data, none, objectives=("click",)).run().score(np.arange(30), "click"))
    kept = override(cfg, ["train.distill_check=0"])  # the check off: the same lists train the student
    taught = CascadeTrainer(data, kept, objectives=("click",), teacher=_missing_lists)
    assert not torch.equal(scores, taught.run().score(np.arange(30), "click"))


def test_ar_by_users_retrains_whole_users(data):
    cfg = override(CFG, ["cascade.recover_by=users", "cascade.recover_frac=0.3"])
    trainer = CascadeTrainer(data, override(cfg, ["train.distill="]), objectives=STAGES)
    full = trainer._batches_and_loss(1, 0, 1.0)[1].targets
    part = trainer._batches_and_loss(1, 2, 0.3)[1].targets  # recover-1
    kept = np.flatnonzero(np.diff(part.indptr))
    assert 0.2 < len(kept) / len(np.flatnonzero(np.diff(full.indptr))) < 0.4
    assert (part[kept] != full[kept]).nnz == 0  # each drawn user keeps every one of its pairs
