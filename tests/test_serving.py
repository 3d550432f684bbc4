"""Export -> artifact -> index -> HTTP: the served top-k is the offline fused top-k, and bad input gets a 4xx."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from csmf.app import create_app
from csmf.bench import load_dataset
from csmf.cli import main
from csmf.config import load_config
from csmf.export import ArtifactError, load_artifact
from csmf.index import IndexSettings, build_index, recall_against
from csmf.models.csmf import CSMF
from csmf.serve import Recommender

TINY = [
    "--set", "model.user_hidden=16", "--set", "model.id_dim=8", "--set", "model.history_dim=8",
    "--set", "model.dim=8", "--set", "train.max_epochs=1", "--set", "train.batch_size=256",
]  # fmt: skip


@pytest.fixture(scope="module")
def exported(sim_parquet, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    run, artifact = root / "run", root / "artifact"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--dataset", str(sim_parquet[0]), "--out", str(run), "--quiet", *TINY]) == 0
        assert main(["export", "--run", str(run), "--out", str(artifact), "--weights", "click=1,conversion=2"]) == 0
    finally:
        torch.set_num_threads(before)
    return run, artifact


def offline_top_k(artifact, user_row: int, weights: dict[str, float], k: int) -> list[str]:
    full = {s: float(weights.get(s, 0.0)) for s in artifact.stages}
    scores = (artifact.user_vectors[user_row] * artifact.fold(full)) @ artifact.item_vectors.T
    scores[artifact.seen(user_row)] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return [artifact.item_ids[i] for i in order]


def test_artifact_folds_weights_exactly_like_the_trained_model(exported):
    run, path = exported
    artifact = load_artifact(path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["default_weights"] == {"click": 1.0, "conversion": 2.0}
    assert artifact.stages == ("exposure", "click", "conversion") and artifact.dim == 8
    cfg = load_config(run / "config.toml")
    model = CSMF(cfg, run_dir=str(run / "checkpoints")).fit(load_dataset(cfg))  # every phase done: loads only
    users = np.arange(12)
    weights = {"exposure": 0.2, "click": 0.0, "conversion": 1.5}
    expected = model.user_vectors(users, weights).numpy()
    np.testing.assert_allclose(artifact.user_vectors[users] * artifact.fold(weights), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(artifact.item_vectors, model.item_vectors().numpy(), rtol=1e-6)


def test_loading_refuses_a_changed_file_or_another_version(exported, tmp_path):
    _, path = exported
    copy = tmp_path / "a"
    copy.mkdir()
    for f in path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    vectors = np.load(copy / "item_vectors.npy")
    np.save(copy / "item_vectors.npy", vectors + 1e-3)
    with pytest.raises(ArtifactError, match="item_vectors.npy: checksum"):
        load_artifact(copy)
    manifest = json.loads((path / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version 99"):
        load_artifact(copy)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(tmp_path)


def test_hnsw_recall_against_exact():
    rng = np.random.default_rng(0)
    items, queries = rng.normal(size=(5000, 8)).astype(np.float32), rng.normal(size=(200, 8)).astype(np.float32)
    items *= rng.lognormal(0.0, 0.3, size=(5000, 1)).astype(np.float32)  # uneven norms, as trained item vectors have
    queries = queries - 1.0  # queries off the origin, as fused user vectors are
    exact = build_index(items)
    hnsw = build_index(items, IndexSettings(kind="hnsw", hnsw_m=32, hnsw_ef_search=256))
    assert recall_against(exact, exact, queries) == 1.0
    assert recall_against(exact, hnsw, queries) >= 0.95
    exact_scores, exact_rows = exact.search(queries[:5], 10)
    hnsw_scores, hnsw_rows = hnsw.search(queries[:5], 10)
    same = exact_rows == hnsw_rows
    np.testing.assert_allclose(hnsw_scores[same], exact_scores[same], rtol=1e-3, atol=1e-3)  # IP recovered
    with pytest.raises(ValueError, match="index kind"):
        build_index(items, IndexSettings(kind="ivf"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(exported):
    """The real app under uvicorn on a free local port (one thread), with the popularity fallback off."""
    artifact = load_artifact(exported[1])
    recommender = Recommender(artifact, build_index(artifact.item_vectors))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(recommender), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    yield f"http://127.0.0.1:{port}", artifact
    srv.should_exit = True
    thread.join(timeout=10)


def test_served_top_k_equals_the_offline_fused_top_k(server):
    url, artifact = server
    user = artifact.user_ids[5]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    info = httpx.get(f"{url}/info").json()
    assert info["stages"] == list(artifact.stages) and info["index"] == "exact" and info["dim"] == 8
    rankings = []
    for text, weights in (
        ("exposure:1", {"exposure": 1.0}),
        ("click:0.3,conversion:0.7", {"click": 0.3, "conversion": 0.7}),
    ):
        body = httpx.get(f"{url}/recommend", params={"user_id": user, "k": 10, "weights": text}).json()
        ids = [item["item_id"] for item in body["items"]]
        assert ids == offline_top_k(artifact, 5, weights, 10)
        for item in body["items"]:  # fused = sum_k w_k s_k, as the algebra says
            fused = sum(body["weights"][s] * item["scores"][s] for s in artifact.stages)
            assert item["score"] == pytest.approx(fused, rel=1e-4, abs=1e-5)
        assert set(ids).isdisjoint(artifact.item_ids[i] for i in artifact.seen(5))
        rankings.append(ids)
    assert rankings[0] != rankings[1]  # other weights, other ranking
    default = httpx.get(f"{url}/recommend", params={"user_id": user, "k": 5}).json()
    assert default["weights"] == {"exposure": 0.0, "click": 1.0, "conversion": 2.0}
    batch = httpx.post(f"{url}/recommend", json={"user_ids": [user, artifact.user_ids[6]], "k": 10,
                                                  "weights": {"click": 0.3, "conversion": 0.7}}).json()  # fmt: skip
    assert [i["item_id"] for i in batch["results"][0]["items"]] == rankings[1]


def test_search_with_a_callers_own_vector(server):
    url, artifact = server
    q = artifact.user_vectors[3] * artifact.fold({"exposure": 0.0, "click": 1.0, "conversion": 0.5})
    body = httpx.post(f"{url}/search", json={"vector": q.tolist(), "k": 5}).json()
    expected = np.argsort(-(artifact.item_vectors @ q), kind="stable")[:5]
    assert [i["item_id"] for i in body["items"]] == [artifact.item_ids[i] for i in expected]
    short = httpx.post(f"{url}/search", json={"vector": [1.0, 2.0], "k": 5})
    assert short.status_code == 422 and short.json()["detail"][0]["loc"] == ["body", "vector"]


@pytest.mark.parametrize(
    "params, field",
    [
        ({"weights": "clicks:1"}, "weights"),
        ({"weights": "click:-1"}, "weights"),
        ({"weights": "click:nan"}, "weights"),
        ({"weights": "click:0,conversion:0"}, "weights"),
        ({"weights": "click"}, "weights"),
        ({"weights": "click:abc"}, "weights"),
        ({"k": 0}, "k"),
        ({"k": 100000}, "k"),
    ],
)
def test_bad_input_is_422_naming_the_field(server, params, field):
    url, artifact = server
    response = httpx.get(f"{url}/recommend", params={"user_id": artifact.user_ids[0], **params})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == field


def test_unknown_user_is_404_or_the_popularity_fallback(server, exported):
    url, _ = server
    response = httpx.get(f"{url}/recommend", params={"user_id": "no-such-user"})
    assert response.status_code == 404 and "no-such-user" in response.text
    artifact = load_artifact(exported[1])
    fallback = Recommender(artifact, build_index(artifact.item_vectors), popularity_fallback=True)
    result = fallback.recommend(["no-such-user"], 3, None, True)[0]
    assert result.fallback and [i["item_id"] for i in result.items] == [
        artifact.item_ids[i] for i in np.argsort(-artifact.popularity, kind="stable")[:3]
    ]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def test_page_updates_its_list_when_a_slider_moves(server):
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (Debian package `chromium`; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")
    url, artifact = server
    user = artifact.user_ids[int(np.argmax(np.diff(artifact.seen_indptr)))]  # the page's first user
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(f"{url}/")
        page.wait_for_selector("#results tbody tr")
        assert page.input_value("#user") == user
        before = page.inner_text("#results tbody")
        assert "index: exact" in page.inner_text("#status")
        move = "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }"
        for stage in artifact.stages:  # exposure only
            page.eval_on_selector(f"#w-{stage}", move, "1" if stage == "exposure" else "0")
        page.wait_for_function("b => document.querySelector('#results tbody').innerText !== b", arg=before)
        page.wait_for_timeout(300)  # let the last slider's answer land
        shown = [row.split("\t")[1] for row in page.inner_text("#results tbody").splitlines()]
        assert shown == offline_top_k(artifact, artifact.user_ids.index(user), {"exposure": 1.0}, 10)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serving-page.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "serving-page.png").stat().st_size > 1000


def test_milvus_lite_returns_the_faiss_exact_top_k(tmp_path):
    pytest.importorskip("pymilvus", reason="pymilvus is in the [test] extra")
    rng = np.random.default_rng(1)
    items, queries = rng.normal(size=(800, 8)).astype(np.float32), rng.normal(size=(20, 8)).astype(np.float32)
    milvus = build_index(items, IndexSettings(kind="milvus", milvus_uri=str(tmp_path / "items.db")))
    exact_scores, exact_rows = build_index(items).search(queries, 10)
    scores, rows = milvus.search(queries, 10)
    np.testing.assert_array_equal(rows, exact_rows)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)


def test_loadtest_drives_a_real_server_and_reports_latency(exported, tmp_path):
    from csmf.loadtest import run_loadtest

    out = tmp_path / "load.json"
    result = run_loadtest(exported[1], clients=4, requests=60, k=10, out=out, log=lambda _: None)
    assert result["errors"] == 0 and result["requests"] == 60
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p95"] <= result["latency_ms"]["p99"]
    assert json.loads(out.read_text())["throughput_rps"] > 0


def test_querybench_measures_fused_single_and_per_index_queries(exported, tmp_path):
    from csmf.querybench import run_querybench

    result = run_querybench(tmp_path / "q.json", n_items=3000, users=8, artifact=str(exported[1]), log=lambda _: None)
    fusion, hnsw = result["fusion"], result["hnsw"]
    assert fusion["items"] == 3000 and fusion["fused_seconds"] > 0 and fusion["per_index_over_single"] > 0
    assert 0.0 <= hnsw["recall_at_50"] <= 1.0 and hnsw["speedup"] > 0
