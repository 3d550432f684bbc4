"""One contract battery, run over every model the benchmark knows: each is built by the benchmark's own
constructor, fit on a small simulated cascade, and must meet csmf.retriever's contract.

- score: (B, N) finite float32 for every objective it serves;
- determinism: a second fit with the same seed scores bit-identically;
- fusion: score_fused = sum_k w_k score_k; a vector model's user_vectors @ item_vectors().T equals it,
  with W = vectors_per_item x (its vector width);
- parameters: counted honestly (what the model stores and learned); CSMF and its variants have exactly
  the parameters of the single-objective backbone, the multi-task towers more;
- save / load: `load_model(model.save(folder))` scores bit-identically (no pickle anywhere).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csmf.config import Config, override
from csmf.data.logtable import load_log
from csmf.data.split import split_log
from csmf.experiments.bench import model_builder
from csmf.models.csmf import VARIANTS
from csmf.models.multitask import KINDS

CFG = override(
    Config(),
    [
        "model.dim=8", "multitask.expert_dim=16", "multitask.kernel_dim=8", "train.max_epochs=1",
        "als.factors=8", "als.iterations=2", "itemknn.neighbours=20", "ease.l2=50", "bench.tune=false",
    ],
)  # fmt: skip
STAGES = ("exposure", "click", "conversion")
MODELS = ["popularity", "als", "itemknn", "ease", *(f"single-{s}" for s in STAGES), *VARIANTS, *KINDS]
WEIGHTS = {"exposure": 0.2, "click": 0.5, "conversion": 1.0}
USERS = np.array([0, 5, 17, 299, 120])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(sim_parquet, one_thread):
    return split_log(load_log(sim_parquet[0]), test_frac=0.2, valid_frac=0.1, seed=0, by="random", name="sim")


def fit(name: str, data):
    model, _ = model_builder(name)(CFG, data, False)
    return model.fit(data)


@pytest.fixture(scope="module")
def fitted(data):
    return {name: fit(name, data) for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_scores_every_served_objective(fitted, data, name):
    model = fitted[name]
    served = model.served(data)
    assert set(served) <= set(data.stages) and served
    for stage in served:
        scores = model.score(USERS, stage)
        assert scores.shape == (len(USERS), data.n_items) and scores.dtype == torch.float32
        assert torch.isfinite(scores).all()


@pytest.mark.parametrize("name", MODELS)
def test_the_same_seed_fits_the_same_model(fitted, data, name):
    again = fit(name, data)
    for stage in fitted[name].served(data):
        assert torch.equal(again.score(USERS, stage), fitted[name].score(USERS, stage)), stage


@pytest.mark.parametrize("name", MODELS)
def test_fused_scores_are_the_weighted_sum_and_vector_models_serve_them_in_one_search(fitted, data, name):
    model = fitted[name]
    weights = {s: WEIGHTS[s] for s in model.served(data)}
    fused = model.score_fused(USERS, weights)
    expected = sum(w * model.score(USERS, s) for s, w in weights.items())
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
    if not model.has_vectors:
        with pytest.raises(NotImplementedError, match="no vector index"):
            model.item_vectors()
        return
    query, items = model.user_vectors(USERS, weights), model.item_vectors()
    assert items.shape[0] == data.n_items and query.shape == (len(USERS), items.shape[1])
    torch.testing.assert_close(query @ items.T, fused, rtol=1e-4, atol=1e-4)
    width = CFG.als.factors[0] if name == "als" else CFG.model.dim
    assert items.shape[1] == model.vectors_per_item() * width
    with pytest.raises(ValueError, match="all objective weights are zero"):
        model.user_vectors(USERS, {s: 0.0 for s in weights})


def test_parameter_counts_are_honest(fitted, data):
    n, u = data.n_items, data.n_users
    assert fitted["popularity"].num_params() == 0
    assert fitted["als"].num_params() == (u + n) * CFG.als.factors[0] * len(STAGES)
    assert fitted["ease"].num_params() == len(STAGES) * (n * n - n)
    assert 0 < fitted["itemknn"].num_params() <= len(STAGES) * n * CFG.itemknn.neighbours[0]
    backbone = fitted["single-exposure"].num_params()
    for name in (*VARIANTS, "single-click", "single-conversion"):  # the cascade adds no parameter
        assert fitted[name].num_params() == backbone, name
        assert sum(p.numel() for p in fitted[name].model.parameters()) == backbone
    for kind in KINDS:  # experts, gates and heads come on top of the same inputs
        assert fitted[kind].num_params() > backbone, kind


@pytest.mark.parametrize("name", MODELS)
def test_a_saved_model_loads_and_scores_bit_identically(fitted, data, name, tmp_path):
    from csmf.models import load_model

    model = fitted[name]
    loaded = load_model(model.save(tmp_path / name))
    assert type(loaded) is type(model) and loaded.num_params() == model.num_params()
    assert loaded.served(data) == model.served(data)
    for stage in model.served(data):
        assert torch.equal(loaded.score(USERS, stage), model.score(USERS, stage)), stage
    if model.has_vectors:
        weights = {s: WEIGHTS[s] for s in model.served(data)}
        assert torch.equal(loaded.user_vectors(USERS, weights), model.user_vectors(USERS, weights))
        assert torch.equal(loaded.item_vectors(), model.item_vectors())
