"""The cascaded trainer on the small simulated cascade: stage isolation, pruning and claiming, the folded
query, resume after a kill, and determinism.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from csmf.cascade import CascadeTrainer
from csmf.config import config_to_dict, load_config, override, per_stage, save_config
from csmf.data.batches import stage_pairs
from csmf.data.logtable import load_log
from csmf.data.split import split_log
from csmf.evaluation import evaluate
from csmf.models.csmf import CSMF
from csmf.phases import claim, prune
from csmf.prune import cpp_free
from csmf.trained import TrainedCascade

TAU = (0.3, 0.6)  # stage 2 frees one of its two output dims (with 0.3 it may free none: see below)
CFG = override(
    load_config("mlp"),  # this module tests the MLP backbone (backbones/mlp.py); tests/test_graph.py the graph one
    [
        "model.user_hidden=16",
        "model.user_id=true",  # the group counts below include the user-ID table
        "model.id_dim=8",
        "model.history_dim=8",
        "model.dim=8",
        "train.max_epochs=2",
        "train.batch_size=256",
        f"cascade.tau={TAU[0]},{TAU[1]}",
    ],
)
OBJECTIVES = ("exposure", "click", "conversion")
WEIGHTS = {"exposure": 0.2, "click": 0.5, "conversion": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(sim_parquet, one_thread):
    """The same split as conftest's `sim_data`, shared by the module's trained models (read-only)."""
    return split_log(load_log(sim_parquet[0]), test_frac=0.2, valid_frac=0.1, seed=0, by="random", name="sim")


def pairs_of_stage(trainer: CascadeTrainer, stage: int):
    """(users, items, weights) stage `stage` of the trainer trains on."""
    aux = per_stage(trainer.cfg.train.aux_weight, stage)
    return stage_pairs(trainer.tuning, trainer.objectives[stage - 1], aux)


def full_history(data):
    return data.train | data.side


def tuning_history(trainer: CascadeTrainer):
    return {b: trainer.tuning.matrix(b) for b in trainer.model.behaviours}


def stage_scores(model, data, stage: str, restore: dict | None = None) -> torch.Tensor:
    """Objective `stage` scores of every user (top = all three stages). TrainedCascade swaps the model's
    history matrices; `restore` puts the trainer's training history back."""
    scorer = TrainedCascade(model, OBJECTIVES, full_history(data), len(OBJECTIVES))
    scores = scorer.score(np.arange(data.n_users), stage).clone()
    if restore is not None:
        model.set_history(restore)
    return scores


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unit_params(state: dict) -> list[tuple[str, str, int]]:
    """(parameter key, owner key, unit axis) for every owned parameter of an MLPBackbone state dict: linear
    layers (units = weight rows and bias entries) and embedding tables (units = columns; no bias)."""
    out = []
    for owner_key in state:
        if not owner_key.endswith(".owner"):
            continue
        prefix = owner_key.removesuffix(".owner")
        if f"{prefix}.bias" in state:
            out += [(f"{prefix}.weight", owner_key, 0), (f"{prefix}.bias", owner_key, 0)]
        else:
            out.append((f"{prefix}.weight", owner_key, 1))
    return out


def unit_slice(tensor: torch.Tensor, axis: int, mask: torch.Tensor) -> torch.Tensor:
    return tensor[:, mask] if axis == 1 else tensor[mask]


def changed_and_frozen(before: dict, after: dict, frozen_stages: set[int], stage: int) -> int:
    """Assert every entry of a unit owned by `frozen_stages` is bit-identical; count the parameters in
    which `stage`'s units moved."""
    changed = 0
    for key, owner_key, axis in unit_params(after):
        owner = after[owner_key]
        frozen = torch.isin(owner, torch.tensor(sorted(frozen_stages)))
        assert frozen.any(), key
        assert torch.equal(unit_slice(before[key], axis, frozen), unit_slice(after[key], axis, frozen)), key
        mine = owner == stage
        if mine.any() and not torch.equal(unit_slice(before[key], axis, mine), unit_slice(after[key], axis, mine)):
            changed += 1
    return changed


# ----- a 3-stage cascade run phase by phase --------------------------------------------------------


@pytest.fixture(scope="module")
def staged(data):
    """train-1, prune-1, recover-1, train-2, prune-2, recover-2, train-3 called one by one, with
    snapshots (state dicts: parameters and owners) and objective scores between them."""
    tr = CascadeTrainer(data, CFG)
    assert tr.objectives == OBJECTIVES
    s = {"trainer": tr}
    tr.run_phase(0)
    s["trained_1"] = copy.deepcopy(tr.model)
    s["pre_prune"] = [(name, mag.clone(), owner.clone()) for name, mag, owner in tr.model.prunable()]
    s["prune_record"] = tr.run_phase(1)
    s["post_prune"] = {name: owner.clone() for name, _, owner in tr.model.prunable()}
    s["post_prune_item_output"] = tr.model.item.layers[-1].owner.clone()
    tr.run_phase(2)
    s["before_2"] = snapshot(tr.model)
    s["stage1_before_2"] = stage_scores(tr.model, data, "exposure", tuning_history(tr))
    tr.run_phase(3)
    s["after_2"] = snapshot(tr.model)
    s["model_2"] = copy.deepcopy(tr.model)
    s["owners_2"] = {name: owner.clone() for name, _, owner in tr.model.prunable()}
    s["item_output_2"] = tr.model.item.layers[-1].owner.clone()
    s["scores_2"] = {o: stage_scores(tr.model, data, o, tuning_history(tr)) for o in OBJECTIVES}
    tr.run_phase(4)
    tr.run_phase(5)
    s["before_3"] = snapshot(tr.model)
    s["scores_before_3"] = {o: stage_scores(tr.model, data, o, tuning_history(tr)) for o in OBJECTIVES}
    tr.run_phase(6)
    s["after_3"] = snapshot(tr.model)
    s["scores_3"] = {o: stage_scores(tr.model, data, o, tuning_history(tr)) for o in OBJECTIVES}
    return s


def l1_magnitudes(model) -> dict[str, torch.Tensor]:
    """Unit magnitudes from first principles when every unit is stage 1's (the first prune): the L1
    norm of an embedding column, of a hidden unit's incoming weights, of an output dimension's user
    and item rows together."""
    out = {}
    for tname, tower in (("user", model.user), ("item", model.item)):
        for n, emb in enumerate(tower.embeddings()):
            out[f"{tname}.emb{n}"] = emb.weight.detach().abs().sum(dim=0)
        for n, layer in enumerate(tower.layers[:-1]):
            out[f"{tname}.hidden{n}"] = layer.weight.detach().abs().sum(dim=1)
    user_out, item_out = model.user.layers[-1].weight.detach(), model.item.layers[-1].weight.detach()
    out["output"] = user_out.abs().sum(dim=1) + item_out.abs().sum(dim=1)
    return out


def test_prune_frees_what_cpp_says(staged):
    pre = staged["pre_prune"]
    post = staged["post_prune"]
    expected_mag = l1_magnitudes(staged["trained_1"])
    assert [name for name, _, _ in pre] == list(post) == list(expected_mag)
    assert len(post) == 7  # user: id, history, segment feature, hidden; item: id, category; output
    total_freed = 0
    for name, mag, owner in pre:
        assert bool((owner == 1).all()), name
        torch.testing.assert_close(mag, expected_mag[name], rtol=1e-6, atol=0)
        expected = cpp_free(expected_mag[name], owner, 1, TAU[0])
        assert torch.equal(post[name] == 0, expected), name
        assert bool((post[name][~expected] == 1).all()), name  # kept units stay stage 1's
        assert int((post[name] == 1).sum()) >= 1, name
        # The fraction freed per group, as recorded in the phase log.
        assert staged["prune_record"]["freed_share"][name] == round(float(expected.float().mean()), 4), name
        # CPP frees units holding at most tau of the group's mass.
        assert float(expected_mag[name][expected].sum()) <= TAU[0] * float(expected_mag[name].sum()) + 1e-6, name
        total_freed += int(expected.sum())
    assert total_freed > 0
    assert (post["output"] == 0).any() and (post["user.hidden0"] == 0).any()
    # One owner vector for both towers' output dimensions.
    assert torch.equal(staged["post_prune_item_output"], post["output"])


def test_claim_gives_every_free_unit_to_stage_2(staged):
    for name, owner in staged["owners_2"].items():
        before = staged["post_prune"][name]
        assert not (owner == 0).any(), name
        assert torch.equal(owner == 2, before == 0), name  # exactly the freed units
        assert torch.equal(owner == 1, before == 1), name
    assert torch.equal(staged["item_output_2"], staged["owners_2"]["output"])
    assert set(staged["owners_2"]["output"].tolist()) == {1, 2}
    # At the end, three stages own output dimensions (so objective 3 is not objective 2's score).
    final = staged["trainer"].model
    assert set(final.output_owner.tolist()) == {1, 2, 3}
    assert torch.equal(final.item.layers[-1].owner, final.user.layers[-1].owner)


def test_stage_1_units_are_bit_identical_after_stage_2_trains(staged):
    changed = changed_and_frozen(staged["before_2"], staged["after_2"], {1}, 2)
    assert changed >= 3, changed  # stage 2 did learn: its (claimed) units moved in several tensors
    assert torch.equal(staged["stage1_before_2"], staged["scores_2"]["exposure"])
    assert not torch.equal(staged["scores_2"]["click"], staged["scores_2"]["exposure"])


def test_stages_1_and_2_are_frozen_while_stage_3_trains(staged):
    changed = changed_and_frozen(staged["before_3"], staged["after_3"], {1, 2}, 3)
    assert changed >= 3, changed
    for objective in OBJECTIVES[:2]:
        assert torch.equal(staged["scores_before_3"][objective], staged["scores_3"][objective]), objective
    assert not torch.equal(staged["scores_before_3"]["conversion"], staged["scores_3"]["conversion"])
    # Stage 1's output was fixed after recover-1: its scores never moved since.
    assert torch.equal(staged["scores_3"]["exposure"], staged["stage1_before_2"])


def test_weights_stage_1_must_not_read_are_never_used(staged, data):
    model = copy.deepcopy(staged["model_2"])
    reference = staged["scores_2"]
    g = torch.Generator().manual_seed(123)
    rewritten = 0
    with torch.no_grad():
        for tower in (model.user, model.item):
            for layer, owner_in in tower.layer_inputs():
                # W[j, i] with owner_out[j] = 1 and owner_in[i] = 2: a stage-1 unit reading a stage-2 unit.
                cross = (layer.owner == 1).unsqueeze(1) & (owner_in == 2).unsqueeze(0)
                noise = torch.randn(layer.weight.shape, generator=g) * 10
                layer.weight[cross] = noise[cross]
                rewritten += int(cross.sum())
    assert rewritten > 0
    assert torch.equal(stage_scores(model, data, "exposure"), reference["exposure"])
    assert torch.equal(stage_scores(model, data, "click"), reference["click"])  # W[j, i] unused at stage 2 too

    # Everything stage 2 owns (weight rows, biases, embedding columns) is invisible to stage 1 as well.
    state = model.state_dict()
    with torch.no_grad():
        for key, owner_key, axis in unit_params(state):
            two, param = state[owner_key] == 2, state[key]
            if axis == 1:
                param[:, two] = torch.randn(param[:, two].shape, generator=g)
            else:
                param[two] = torch.randn(param[two].shape, generator=g)
    assert torch.equal(stage_scores(model, data, "exposure"), reference["exposure"])
    assert not torch.equal(stage_scores(model, data, "click"), reference["click"])
    # ... while a stage-1 row does matter (so the checks above can fail).
    with torch.no_grad():
        model.user.layers[0].weight[model.user.layers[0].owner == 1] += 1.0
    assert not torch.equal(stage_scores(model, data, "exposure"), reference["exposure"])


# ----- the benchmark wrapper: folded query -----------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(data):
    return CSMF(CFG).fit(data)


def test_folded_query_is_the_weighted_sum_of_objective_scores(fitted, data):
    users = np.arange(0, data.n_users, 3)
    query = fitted.user_vectors(users, WEIGHTS)
    items = fitted.item_vectors()
    assert items.shape == (data.n_items, CFG.model.dim)
    assert query.shape == (len(users), CFG.model.dim)
    folded = query @ items.T
    expected = sum(w * fitted.score(users, o) for o, w in WEIGHTS.items())
    scale = float(expected.abs().max())
    assert scale > 0
    assert float((folded - expected).abs().max()) <= 1e-4 * scale
    assert torch.equal(fitted.score_fused(users, WEIGHTS), folded)
    # The three objectives really are different scores (the check above is not vacuous).
    assert not torch.equal(fitted.score(users, "exposure"), fitted.score(users, "click"))
    assert not torch.equal(fitted.score(users, "click"), fitted.score(users, "conversion"))
    # Leaving an objective out drops it from the query.
    only = fitted.score_fused(users, {"click": 2.0})
    assert float((only - 2.0 * fitted.score(users, "click")).abs().max()) <= 1e-4 * scale
    settings = fitted.settings()
    assert settings["vector_dim"] == CFG.model.dim
    assert settings["objectives"] == list(OBJECTIVES)
    assert [p["phase"] for p in fitted.phases] == [
        "train-1", "prune-1", "recover-1", "train-2", "prune-2", "recover-2", "train-3"
    ]  # fmt: skip


def test_cascade_has_the_parameters_of_one_two_tower(fitted, data):
    single = CSMF.variant("single-click", CFG).fit(data)
    assert single.served(data) == ("click",)
    assert [p["phase"] for p in single.phases] == ["train-1"]
    assert fitted.num_params() == single.num_params() > 0
    assert single.item_vectors().shape == fitted.item_vectors().shape


# ----- resume after a kill ---------------------------------------------------------------------------

CHILD = r"""
import os, sys, time
from pathlib import Path

import torch

torch.set_num_threads(1)  # the parent computes with one thread too: bit-identical results

from csmf import stage_loss
from csmf.cascade import CascadeTrainer
from csmf.config import SimConfig, load_config
from csmf.data.logtable import load_log
from csmf.data.simulate import simulate
from csmf.data.split import split_log

root = Path(sys.argv[1])
simulate(SimConfig(n_users=300, n_items=200), root / "sim.parquet", progress=False)
data = split_log(load_log(root / "sim.parquet"), test_frac=0.2, valid_frac=0.1, seed=0, by="random", name="sim")
cfg = load_config(root / "cfg.toml")
original, calls, parent = stage_loss.PairLoss.__call__, [0], os.getppid()


def stalling_loss(self, batch):
    if self.stage == 2:
        calls[0] += 1
        if calls[0] == 4:  # train-2 has taken 3 optimiser steps that no checkpoint holds: hang, get killed
            (root / "stalled").write_text("stalled")
            while os.getppid() == parent:  # never outlive the test process
                time.sleep(0.05)
            sys.exit(3)
    return original(self, batch)


stage_loss.PairLoss.__call__ = stalling_loss
CascadeTrainer(data, cfg, run_dir=root / "run").run()
"""


def kill_mid_phase(root: Path, timeout: float = 120.0) -> None:
    save_config(CFG, root / "cfg.toml")
    log = (root / "child.log").open("w")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], cwd=root, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not (root / "stalled").exists():
            if child.poll() is not None:
                pytest.fail(f"child exited ({child.returncode}) before stalling:\n{(root / 'child.log').read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"child did not reach train-2 in {timeout}s:\n{(root / 'child.log').read_text()}")
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        log.close()
    assert child.returncode == -signal.SIGKILL


def comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    kill_mid_phase(tmp_path)
    run_dir = tmp_path / "run"
    done = sorted(p.name for p in run_dir.glob("phase-*.pt"))
    assert done == ["phase-00-train-1.pt", "phase-01-prune-1.pt", "phase-02-recover-1.pt"]
    assert not list(run_dir.glob("*.partial"))

    # The parent reads the log the child simulated: same data, same config.
    data = split_log(load_log(tmp_path / "sim.parquet"), test_frac=0.2, valid_frac=0.1, seed=0, by="random", name="sim")
    assert config_to_dict(load_config(tmp_path / "cfg.toml")) == config_to_dict(CFG)

    fresh = CascadeTrainer(data, CFG, run_dir=tmp_path / "fresh")
    expected = evaluate(fresh.run(), data)

    (run_dir / "phase-03-train-2.pt.partial").write_bytes(b"torn write")  # a save cut short is ignored
    messages: list[str] = []
    resumed = CascadeTrainer(data, CFG, run_dir=run_dir, log=messages.append)
    got = evaluate(resumed.run(), data)
    assert any("resuming after phase recover-1" in m for m in messages), messages
    assert got == expected
    assert set(got) == set(OBJECTIVES) and got["exposure"]["recall@50"] > 0
    assert comparable(resumed.history) == comparable(fresh.history)
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert len(list(run_dir.glob("phase-*.pt"))) == len(resumed.phases) == 7

    # A completed run resumes to the end: no phase runs, the history is the saved one.
    def no_phase(*_args):
        raise AssertionError("a completed run must not run a phase again")

    again = CascadeTrainer(data, CFG, run_dir=run_dir)
    again._train = again._prune = again._recover = no_phase
    assert evaluate(again.run(), data) == expected
    assert len(again.history) == len(resumed.history) == 7

    # A run folder written with another config (or another cascade) is refused.
    with pytest.raises(ValueError, match="another config"):
        CascadeTrainer(data, override(CFG, ["seed=1"]), run_dir=run_dir).run()
    with pytest.raises(ValueError, match="another config"):
        CascadeTrainer(data, CFG, objectives=("exposure", "click"), run_dir=run_dir).run()


def test_a_run_folder_from_before_a_config_field_existed_resumes_and_a_changed_field_is_refused(tmp_path):
    """A field added to the config since a phase was saved is not in its checkpoint: its default keeps the old
    behaviour, so the phase resumes (an upgrade must not strand a killed run); a recorded field that differs
    does not."""
    from csmf.checkpoints import save_checkpoint
    from csmf.runfolder import RunFolder

    def saved_with(cfg_dict: dict) -> RunFolder:
        folder = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        meta = {"phase": 0, "history": [], "objectives": ["a", "b"], "config": cfg_dict, "data": "f"}
        save_checkpoint(folder / "phase-00-pretrain.pt", {"w": torch.zeros(2)}, meta)
        return RunFolder(folder, ["pretrain"], ("a", "b"), CFG, "f")

    older = config_to_dict(CFG)
    del older["model"]["graph_neighbours"]  # a checkpoint saved before this field existed
    assert saved_with(older).last()[0] == 0
    changed = config_to_dict(CFG)
    changed["model"]["dim"] += 1
    with pytest.raises(ValueError, match="another config"):
        saved_with(changed).last()


# ----- determinism -----------------------------------------------------------------------------------


def test_same_seed_same_metrics_other_seed_differs(data):
    first = CascadeTrainer(data, CFG)
    a = evaluate(first.run(), data)
    second = CascadeTrainer(data, CFG)
    b = evaluate(second.run(), data)
    assert a == b
    assert comparable(first.history) == comparable(second.history)
    other = CascadeTrainer(data, override(CFG, ["seed=1"]))
    c = evaluate(other.run(), data)
    assert c != a
    assert len(first.history) == len(other.history) == 7
    # The seed reaches the initial weights, not only the batch order.
    init_0, init_1 = CascadeTrainer(data, CFG).model, CascadeTrainer(data, override(CFG, ["seed=1"])).model
    assert not torch.equal(init_0.user.layers[0].weight, init_1.user.layers[0].weight)
    assert torch.equal(init_0.user.layers[0].weight, CascadeTrainer(data, CFG).model.user.layers[0].weight)


# ----- every later stage gets room -----


def test_every_later_stage_gets_an_output_dimension(data):
    tr = CascadeTrainer(data, override(CFG, ["cascade.tau=0.3"]))
    # The state after train-2 of a cascade: each group's last two units are stage 2's, the rest stage 1's.
    for _, _, owner in tr.model.prunable():
        owner.fill_(1)
        owner[-2:] = 2
    tr.model.sync_output_owner()
    with torch.no_grad():
        tr.model.user.layers[0].weight[-1] *= 0.01  # a low-mass stage-2 hidden unit: CPP frees it
        for tower in (tr.model.user, tr.model.item):  # the two stage-2 output dimensions carry the same mass
            tower.layers[-1].weight[-1] = tower.layers[-1].weight[-2]
    prune(tr.model, 2, tr.cfg.cascade, 3)
    claim(tr.model, 3)
    groups = {name: owner for name, _, owner in tr.model.prunable()}
    assert (groups["user.hidden0"] == 3).any()  # stage 3 does get hidden capacity ...
    assert (groups["output"] == 3).any()  # ... but no output dimension to reach the score with


# ----- auxiliary pairs of the other behaviours -----


def test_stage_pairs_add_other_behaviours_at_the_aux_weight(data):
    plain = CascadeTrainer(data, CFG)
    users, items, weights = pairs_of_stage(plain, 3)
    assert weights is None  # default: the stage's own pairs only
    own = {(u, i) for u, i in zip(users.tolist(), items.tolist(), strict=True)}
    assert own == set(zip(*plain.tuning.train["conversion"].nonzero(), strict=True))

    tr = CascadeTrainer(data, override(CFG, ["train.aux_weight=0,0,0.25"]))
    assert pairs_of_stage(tr, 1)[2] is None  # per stage: stage 1 keeps its own pairs only
    users, items, weights = pairs_of_stage(tr, 3)
    pairs = list(zip(users.tolist(), items.tolist(), strict=True))
    assert len(set(pairs)) == len(pairs)  # an aux pair that is also a positive is not counted twice
    by_pair = dict(zip(pairs, weights.tolist(), strict=True))
    others = set()
    for name in ("exposure", "click"):
        others |= set(zip(*tr.tuning.train[name].nonzero(), strict=True))
    assert {p for p, w in by_pair.items() if w == 1.0} == own
    assert {p for p, w in by_pair.items() if w == 0.25} == others - own
    assert set(by_pair) == own | others


def test_reading_a_run_folder_or_scoring_changes_no_model(sim_data, tmp_path):
    from csmf.cascade import CascadeTrainer
    from csmf.config import Config, override
    from csmf.trained import evaluating

    cfg = override(Config(), ["model.dim=8", "train.max_epochs=1", "train.distill="])
    CascadeTrainer(sim_data, cfg, run_dir=tmp_path / "run").run()
    fresh = CascadeTrainer(sim_data, cfg, run_dir=tmp_path / "run")
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    assert fresh.resume_point() == len(fresh.phases)  # finished, and nothing was loaded into the model
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())
    fresh.model.train()
    fresh.retriever(sim_data.train).score(np.arange(4), sim_data.stages[0])  # scoring leaves the mode alone
    assert fresh.model.training
    with evaluating(fresh.model):
        assert not fresh.model.training
    assert fresh.model.training


def test_a_long_epoch_logs_its_progress_where_no_bar_shows(monkeypatch):
    import csmf.training_loop as loop

    weight = torch.nn.Parameter(torch.ones(2))
    model = torch.nn.Module()
    model.weight = weight

    def losses():
        return ((weight * k).sum() for k in (1.0, 2.0, 3.0))

    def run(progress: bool) -> list[str]:
        lines: list[str] = []
        loop.run_epochs(model, torch.optim.SGD([weight], lr=0.0), 1, losses, lambda: (None, {}), patience=1,
                        log=lines.append, progress=progress, desc="stage 1 epoch", steps=3)  # fmt: skip
        return lines

    monkeypatch.setattr(loop, "PROGRESS_LOG_S", 0.0)  # a line after every batch
    monkeypatch.setattr(loop.sys.stderr, "isatty", lambda: False, raising=False)  # a log file
    lines = run(progress=True)
    assert [line.split(" batches")[0] for line in lines] == [f"  stage 1 epoch 1: {k}/3" for k in (1, 2, 3)]
    assert "mean loss 3.0000" in lines[1]  # (2 + 4) / 2
    assert run(progress=False) == []  # --quiet: nothing
    monkeypatch.setattr(loop.sys.stderr, "isatty", lambda: True, raising=False)  # a terminal: tqdm's bar instead
    assert run(progress=True) == []


def test_adam_takes_fused_steps_on_the_largest_tables_and_the_same_steps_as_plain_adam():
    from torch import nn

    from csmf.training_loop import FUSED_ROWS, SplitAdam, adam

    g = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.big = nn.Parameter(torch.randn(FUSED_ROWS + 1, 2, generator=g))
    model.small = nn.Parameter(torch.randn(5, 2, generator=g))
    reference = copy.deepcopy(model)
    split, plain = adam(model, 1e-2), torch.optim.Adam(reference.parameters(), lr=1e-2)
    assert isinstance(split, SplitAdam) and [o.defaults["fused"] for o in split.parts] == [True, None]
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        for m, opt in ((model, split), (reference, plain)):
            opt.zero_grad()
            for p, grad in zip(m.parameters(), grads, strict=True):
                p.grad = grad.clone()
            opt.step()
    assert torch.equal(model.small, reference.small)  # the small table's steps are plain Adam's, bit for bit
    torch.testing.assert_close(model.big, reference.big, rtol=0, atol=1e-6)  # fused: the same to rounding
    assert isinstance(adam(nn.Linear(3, 3), 1e-2), torch.optim.Adam)  # nothing large: one plain Adam


def test_row_sparse_adam_takes_torchs_sparse_adam_steps_bit_for_bit():
    """The row-wise update against torch's SparseAdam: uncoalesced gradients with repeated rows, a coalesced one
    flagged so, a step that touches no row, maximize, and a 3-d table; the parameters and both moments equal."""
    from torch import nn

    from csmf.determinism import deterministic_torch
    from csmf.training_loop import RowSparseAdam, adam

    g = torch.Generator().manual_seed(0)
    # in torch's deterministic mode too, as every run trains (its writes step out of it), which it leaves as it was
    for shape, maximize, mode in (((50, 4), False, deterministic_torch), ((30, 3, 2), True, contextlib.nullcontext)):
        ours = nn.Parameter(torch.randn(shape, generator=g))
        theirs, start = nn.Parameter(ours.detach().clone()), ours.detach().clone()
        kw = {"lr": 0.05, "betas": (0.8, 0.95), "maximize": maximize}
        mine, torchs = RowSparseAdam([ours], **kw), torch.optim.SparseAdam([theirs], **kw)
        for step in range(6):
            rows = torch.randint(0, shape[0], (0 if step == 2 else 40,), generator=g)  # repeats; step 2 none
            values = torch.randn(len(rows), *shape[1:], generator=g)
            grad = torch.sparse_coo_tensor(rows[None], values, shape, check_invariants=True)
            grad = grad.coalesce() if step == 4 else grad
            for p, opt in ((ours, mine), (theirs, torchs)):
                p.grad = grad.clone()
                with mode():
                    before = torch.are_deterministic_algorithms_enabled()
                    opt.step()
                    assert torch.are_deterministic_algorithms_enabled() == before
        assert not torch.equal(ours, start)
        assert torch.equal(ours, theirs)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(mine.state[ours][key], torchs.state[theirs][key]), key
        assert mine.state[ours]["step"] == torchs.state[theirs]["step"] == 6
        torchs.load_state_dict(mine.state_dict())  # the same state format: checkpoints load either way
    # a gradient sparse in both dimensions (not a table's rows) takes torch's own update
    ours, theirs = nn.Parameter(torch.ones(4, 3)), nn.Parameter(torch.ones(4, 3))
    grad = torch.sparse_coo_tensor([[0, 2, 2], [1, 0, 1]], [1.0, -2.0, 3.0], (4, 3), check_invariants=True)
    for p, opt in ((ours, RowSparseAdam([ours], lr=0.1)), (theirs, torch.optim.SparseAdam([theirs], lr=0.1))):
        p.grad = grad.clone()
        opt.step()
    assert torch.equal(ours, theirs) and int((ours != 1).sum()) == 3
    table = nn.Embedding(10, 2)
    assert isinstance(adam(table, 1e-2, [table.weight]), RowSparseAdam)
    table.weight.grad = torch.ones(10, 2)
    with pytest.raises(RuntimeError, match="sparse gradients only"):
        RowSparseAdam([table.weight]).step()
