"""Experiment tracking (csmf.tracking): a tiny `csmf train` and `csmf bench` read back from their TensorBoard event
files and from an MLflow file store; what happens without tensorboard or mlflow."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from csmf.cli import main
from csmf.config import Config, ConfigError, config_to_dict, override, training_part

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = [
    "--set", "model.user_hidden=16", "--set", "model.id_dim=8", "--set", "model.history_dim=8",
    "--set", "model.dim=8", "--set", "train.max_epochs=2", "--set", "train.batch_size=256",
    "--set", "select.candidates=",  # one configuration, whatever picks the user cache holds
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in `folder` -> its (step, value) list, as TensorBoard reads them."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every value
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tiny_run(sim_parquet, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracked") / "run"
    assert main(["train", "--dataset", str(sim_parquet[0]), "--out", str(out), "--quiet", *TINY]) == 0
    return out


def test_a_tiny_train_writes_one_value_per_epoch_and_phase_to_tensorboard(tiny_run):
    summary = json.loads((tiny_run / "metrics.json").read_text())
    assert len(list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    curves = scalars(tiny_run / "tensorboard")

    trained = [p for p in summary["phases"] if "epochs" in p]  # train-k and recover-k
    assert [p["phase"] for p in trained] == ["train-1", "recover-1", "train-2", "recover-2", "train-3"]
    assert any(len(p["epochs"]) == 2 for p in trained)  # more than one epoch somewhere: counts are checked
    for p in trained:
        name, epochs = p["phase"], p["epochs"]
        steps = [e["epoch"] for e in epochs]
        assert [s for s, _ in curves[f"loss/{name}"]] == steps
        assert [v for _, v in curves[f"loss/{name}"]] == pytest.approx([e["loss"] for e in epochs], abs=1e-5)
        valid = curves[f"valid/{name}/recall@50"]
        assert valid == [(e["epoch"], pytest.approx(e["valid"]["recall@50"], abs=1e-6)) for e in epochs]
        assert [s for s, _ in curves[f"pairs_per_s/{name}"]] == steps
        assert all(v > 0 for _, v in curves[f"pairs_per_s/{name}"])

    # after each prune: each unit group's shares per owner at step = the pruned stage, summing to 1
    pruned = {p["phase"]: p for p in summary["phases"] if "freed_share" in p}
    assert list(pruned) == ["prune-1", "prune-2"]
    shares = {tag: values for tag, values in curves.items() if tag.startswith("ownership/")}
    groups = {tag.split("/")[1] for tag in shares}
    assert groups and all([s for s, _ in shares[f"ownership/{g}/free"]] == [1, 2] for g in groups)
    for group in groups:
        for step in (1, 2):
            total = sum(dict(v).get(step, 0.0) for tag, v in shares.items() if tag.split("/")[1] == group)
            assert total == pytest.approx(1.0, abs=1e-3)
    assert all(s == 2 for g in groups for s, _ in shares[f"ownership/{g}/stage-2"])  # owned from its prune on
    assert curves["valid/prune-2/recall@50"] == [(2, pytest.approx(pruned["prune-2"]["valid"]["recall@50"]))]

    for stage, metrics in summary["metrics"].items():
        assert curves[f"test/{stage}/recall@50"] == [(0, pytest.approx(metrics["recall@50"]))]


def test_an_mlflow_file_store_holds_the_run_with_its_config_metrics_and_model(sim_parquet, tmp_path, monkeypatch):
    mlflow_tracking = pytest.importorskip("mlflow.tracking")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps file stores behind this switch
    store, out = tmp_path / "mlruns", tmp_path / "run"
    argv = ["train", "--dataset", str(sim_parquet[0]), "--out", str(out), "--quiet", *TINY,
            "--set", f"track.mlflow_uri=file:{store}", "--set", "track.mlflow_experiment=tiny",
            "--set", "track.tensorboard=false"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert not (out / "tensorboard").exists()  # track.tensorboard = false

    client = mlflow_tracking.MlflowClient(tracking_uri=f"file:{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.dim"] == "8" and run.data.params["track.mlflow_uri"] == f"file:{store}"
    train_1 = next(p for p in summary["phases"] if p["phase"] == "train-1")
    history = client.get_metric_history(run.info.run_id, "loss/train-1")
    assert [m.step for m in history] == [e["epoch"] for e in train_1["epochs"]]
    for stage, metrics in summary["metrics"].items():  # MLflow names hold no "@"
        assert run.data.metrics[f"test/{stage}/recall_at_50"] == pytest.approx(metrics["recall@50"])
    assert "model/model.pt" in {f.path for f in client.list_artifacts(run.info.run_id, "model")}


def test_an_mlflow_uri_without_mlflow_installed_is_refused_before_training(sim_parquet, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    from csmf.tracking import Tracker

    with pytest.raises(ConfigError, match=r"track\.mlflow_uri = 'file:/nowhere' needs mlflow.*pip install"):
        Tracker.open(tmp_path, override(Config(), ["track.mlflow_uri=file:/nowhere"]), "run")
    out = tmp_path / "run"
    argv = ["train", "--dataset", str(sim_parquet[0]), "--out", str(out), "--quiet", *TINY,
            "--set", "track.mlflow_uri=file:/nowhere"]  # fmt: skip
    assert main(argv) != 0
    assert not (out / "checkpoints").exists()  # nothing trained


def test_a_file_store_uri_mlflow_refuses_names_the_switch_that_opens_it(tmp_path, monkeypatch):
    environment = pytest.importorskip("mlflow.environment_variables")
    if not hasattr(environment, "MLFLOW_ALLOW_FILE_STORE"):
        pytest.skip("this mlflow opens file stores without a switch")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    from csmf.tracking import Tracker

    cfg = override(Config(), [f"track.mlflow_uri=file:{tmp_path / 'mlruns'}"])
    with pytest.raises(ConfigError, match="track.mlflow_uri = .* MLFLOW_ALLOW_FILE_STORE=true"):
        Tracker.open(tmp_path / "tensorboard", cfg, "run")


def test_a_tracking_server_that_fails_mid_run_stops_mlflow_logging_not_training(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from csmf.tracking import Tracker

    cfg = override(Config(), [f"track.mlflow_uri=file:{tmp_path / 'mlruns'}", "track.tensorboard=false"])
    with Tracker.open(tmp_path / "tensorboard", cfg, "run") as tracker:
        tracker.epoch("train-1", 1, 0.5, {"recall@50": 0.1})
        calls = []

        def down(*args, **kwargs):
            calls.append(args)
            raise ConnectionError("tracking server gone")  # what requests raises: an OSError

        monkeypatch.setattr(tracker.mlflow.client, "log_batch", down)
        with caplog.at_level(logging.WARNING, logger="csmf.tracking"):
            tracker.epoch("train-1", 2, 0.4, {"recall@50": 0.2})
            tracker.test({"click": {"recall@50": 0.2}})
    assert len(calls) == 1  # stopped after the first failure
    assert sum("MLflow logging stopped" in r.getMessage() for r in caplog.records) == 1


def test_without_tensorboard_a_run_trains_on_and_says_so_once(tmp_path, monkeypatch, caplog):
    import csmf.tracking as tracking

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    monkeypatch.setattr(tracking, "_said_no_tensorboard", False)
    with caplog.at_level(logging.WARNING, logger="csmf.tracking"):
        for run in ("a", "b"):
            with tracking.Tracker.open(tmp_path / run, Config(), run) as tracker:
                tracker.epoch("train-1", 1, 0.5, {"recall@50": 0.1}, 100.0)
                tracker.test({"click": {"recall@50": 0.2}})
    said = [r.getMessage() for r in caplog.records if "tensorboard is not installed" in r.getMessage()]
    assert len(said) == 1 and "track.tensorboard = false" in said[0]
    assert not any(tmp_path.iterdir())  # no event file, no folder


def test_tracking_settings_do_not_change_what_a_run_trains():
    """track is a harness section: run folders resume and stored picks are found whatever it says."""
    tracked = override(Config(), ["track.mlflow_uri=http://mlflow:5000", "track.tensorboard=false"])
    assert training_part(config_to_dict(tracked)) == training_part(config_to_dict(Config()))


def test_each_bench_row_writes_its_own_curves_and_test_metrics(sim_parquet, tmp_path):
    out = tmp_path / "results"
    argv = ["bench", "--dataset", str(sim_parquet[0]), "--models", "popularity,mmoe", "--no-tune", "--out", str(out),
            "--set", "multitask.max_epochs=2", "--set", "multitask.patience=2", "--set", "model.dim=8",
            "--set", "select.candidates=", "--set", "bench.cost_items=0", "--set", "bench.sweep_points=0",
            "--set", "bench.cold_items=0", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    mmoe = json.loads((folder / "mmoe.json").read_text())
    epochs = mmoe["tuning"][0]["epochs"]
    curves = scalars(folder / "tensorboard" / "mmoe")
    assert [s for s, _ in curves["loss/joint"]] == [e["epoch"] for e in epochs] == [1, 2]
    stage = next(iter(mmoe["metrics"]))
    assert curves[f"valid/joint/{stage}/recall@50"] == [
        (e["epoch"], pytest.approx(e["valid"][stage]["recall@50"], abs=1e-6)) for e in epochs
    ]
    popularity = scalars(folder / "tensorboard" / "popularity")  # no epochs: its test metrics only
    assert set(popularity) == {f"test/{s}/{m}" for s in mmoe["metrics"] for m in mmoe["metrics"][s]}
