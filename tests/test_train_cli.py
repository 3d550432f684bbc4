"""`csmf train` end to end on a tiny simulated log: run folder, metrics, demo tables, resume, bench wiring."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from csmf.cli import main

TINY = [
    "--set", "model.user_hidden=16", "--set", "model.id_dim=8", "--set", "model.history_dim=8",
    "--set", "model.dim=8", "--set", "train.max_epochs=1", "--set", "train.batch_size=256",
    "--set", "select.candidates=",  # one configuration (checkpoints/), whatever picks the user cache holds
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_writes_run_folder_and_shows_two_weightings(sim_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--dataset", str(sim_parquet[0]), "--out", str(out), "--quiet", *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["metrics"]) == {"exposure", "click", "conversion"}
    assert summary["vector_dim"] == 8
    assert (out / "config.toml").exists()
    assert len(list((out / "checkpoints").glob("phase-*.pt"))) == len(summary["phases"]) == 7
    assert (out / "model" / "model.pt").exists()  # the saved model export and CSMF.load read
    assert printed.count("top-10 for user") == 2
    assert "'exposure': 1.0" in printed and "'conversion': 1.0" in printed

    # A second call finds every phase done: it resumes, trains nothing, and reports the same metrics.
    assert main(argv) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["metrics"] == summary["metrics"]
    assert "resuming after phase train-3" in capsys.readouterr().out


def test_a_catalogue_past_the_full_softmax_limit_trains_on_a_pool_and_says_what_it_changed(sim_parquet, tmp_path,
                                                                                            capsys):  # fmt: skip
    from csmf.config import load_config
    from csmf.models.csmf import CSMF

    out = tmp_path / "run"
    argv = ["train", "--dataset", str(sim_parquet[0]), "--out", str(out), "--quiet", *TINY,
            "--set", "train.full_softmax_max_items=50"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "model.graph_neighbours = 32" in printed and "train.distill" not in printed  # the teacher stays
    saved = load_config(str(out / "config.toml"))
    assert saved.train.distill == "ease" and saved.model.graph_neighbours == 32
    model = CSMF.load(out / "model")
    assert model.cfg.model.graph_neighbours == 32 and model.model.per_batch()
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["config"]["model"]["graph_neighbours"] == 32
    assert all(m["recall@50"] > 0 for m in summary["metrics"].values())
    assert main(argv) == 0  # the adapted run resumes as any other
    assert "resuming after phase train-3" in capsys.readouterr().out


def test_a_split_with_no_test_pair_is_refused_before_training(tmp_path, capsys):
    log = tmp_path / "one-pair-each.csv"  # every user logs one pair: the random split keeps it for training
    log.write_text("user_id,item_id,click,buy\n" + "".join(f"u{u},i{u % 40},1,{u % 2}\n" for u in range(300)))
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(log), "--out", str(out), "--quiet", *TINY]) == 2
    err = capsys.readouterr().err
    assert "the split leaves no test pair in any stage" in err and "0 of 300 users have 2 or more" in err
    assert "Traceback" not in err and not (out / "checkpoints").exists() and not (out / "metrics.json").exists()


def test_a_last_stage_with_no_test_pair_still_shows_a_user_and_says_why_it_has_no_metrics(tmp_path, capsys):
    rows = [f"u{u},i{(u * 7 + k) % 40},1,0\n" for u in range(80) for k in range(6)]  # clicks: held out per user
    rows += [f"u{u},i{u % 40},1,1\n" for u in range(80, 140)]  # every buy is its user's only pair
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,click,buy\n" + "".join(rows))
    assert main(["train", "--dataset", str(log), "--out", str(tmp_path / "run"), "--quiet", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "note: no test metrics for 'buy'" in printed and printed.count("top-10 for user") == 2


def test_train_rejects_unknown_weight_stage(sim_parquet, tmp_path, capsys):
    argv = ["train", "--dataset", str(sim_parquet[0]), "--out", str(tmp_path), "--weights", "buy:1", "--quiet", *TINY]
    assert main(argv) == 2
    assert "--weights 'buy:1': unknown stage 'buy'" in capsys.readouterr().err
    argv[argv.index("buy:1")] = "click=1"  # the one syntax is stage:weight, on the CLI as over HTTP
    assert main(argv) == 2
    assert "'click=1' is not stage:weight" in capsys.readouterr().err


def test_bench_runs_csmf_variants_and_single(sim_parquet, tmp_path, capsys):
    argv = ["bench", "--dataset", str(sim_parquet[0]), "--models", "csmf-no-ar,single-click", "--out", str(tmp_path)]
    assert main([*argv, "--quiet", *TINY]) == 0
    no_ar = json.loads((tmp_path / "sim" / "csmf-no-ar.json").read_text())
    single = json.loads((tmp_path / "sim" / "single-click.json").read_text())
    assert set(no_ar["metrics"]) == {"exposure", "click", "conversion"}
    assert set(single["metrics"]) == {"click"}
    assert no_ar["params"] == single["params"] > 0  # same backbone, no extra parameters
    assert not any(p["phase"].startswith("recover") for p in no_ar["tuning"])
    assert "item vectors of dimension 8" in capsys.readouterr().out


# ----- run folders and checkpoints: never silently reused, never code ---------------------------------


class Payload:
    """What an attacker would plant: unpickling it writes a file (a stand-in for running any code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "code ran"))


def _shuffled_copy(path, out):
    """The same log with its item column shuffled: the same users, items and size, other pairs."""
    table = pq.read_table(path)
    items = table.column("item_id").to_numpy()
    shuffled = np.random.default_rng(1).permutation(items)
    pq.write_table(table.set_column(table.column_names.index("item_id"), "item_id", pa.array(shuffled)), out)
    return out


def test_retraining_on_other_data_into_the_same_folder_is_refused_until_overwrite(sim_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(sim_parquet[0]), "--out", str(out), "--quiet", *TINY]) == 0
    first = json.loads((out / "metrics.json").read_text())
    other = _shuffled_copy(sim_parquet[0], tmp_path / "other.parquet")
    argv = ["train", "--dataset", str(other), "--out", str(out), "--quiet", *TINY]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints trained on other data" in err and "--overwrite" in err and str(out) in err
    assert json.loads((out / "metrics.json").read_text()) == first  # nothing was overwritten
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["metrics"] != first["metrics"]  # trained afresh


def test_other_data_is_refused_whichever_candidate_folders_the_runs_use(sim_parquet, tmp_path, capsys):
    """A first run trained one configuration (checkpoints/), the second searches candidates (checkpoints/<name>):
    the earlier run's checkpoints still refuse other data before anything is trained or written."""
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(sim_parquet[0]), "--out", str(out), "--quiet", *TINY]) == 0
    first = json.loads((out / "metrics.json").read_text())
    other = _shuffled_copy(sim_parquet[0], tmp_path / "other.parquet")
    search = ["--set", "select.candidates=graph,graph model.graph_hops=1", "--set", f"select.store_dir={tmp_path}"]
    capsys.readouterr()
    assert main(["train", "--dataset", str(other), "--out", str(out), "--quiet", *TINY, *search]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints trained on other data" in err and "--overwrite" in err
    assert json.loads((out / "metrics.json").read_text()) == first and not (out / "checkpoints" / "graph").exists()


def test_a_planted_pickle_checkpoint_is_refused_and_never_runs(sim_parquet, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned.txt"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"state": Payload(marker)}, out / "checkpoints" / "phase-00-train-1.pt")
    assert main(["train", "--dataset", str(sim_parquet[0]), "--out", str(out), "--quiet", *TINY]) == 2
    err = capsys.readouterr().err
    assert "phase-00-train-1.pt: refused" in err and "never code" in err
    assert not marker.exists()


def test_a_planted_pretrain_cache_file_is_refused(sim_data, tmp_path):
    from csmf.cascade import CascadeTrainer
    from csmf.checkpoints import CheckpointError
    from csmf.config import Config, override
    from csmf.models.teachers import teacher_for

    cfg = override(Config(), ["model.dim=8", "train.max_epochs=1"])
    marker = tmp_path / "pwned.txt"
    trainer = CascadeTrainer(sim_data, cfg, pretrain_cache=tmp_path / "cache", teacher=teacher_for(cfg))
    (tmp_path / "cache").mkdir()
    torch.save(Payload(marker), trainer.pretrain.path)
    with pytest.raises(CheckpointError, match="refused"):
        trainer.run()
    assert not marker.exists()


def test_export_works_from_another_directory(sim_parquet, tmp_path, monkeypatch):
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(sim_parquet[0], work / "log.parquet")
    monkeypatch.chdir(work)
    assert main(["train", "--dataset", "log.parquet", "--out", "run", "--quiet", *TINY]) == 0  # relative paths
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["export", "--run", str(work / "run"), "--out", "artifact"]) == 0
    assert (elsewhere / "artifact" / "manifest.json").exists()


def test_export_reads_the_saved_model_and_names_the_commands_for_an_older_run_folder(sim_parquet, tmp_path, capsys):
    import shutil

    from csmf.serving.artifact import load_artifact

    log = tmp_path / "log.parquet"
    shutil.copy(sim_parquet[0], log)
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(log), "--out", str(run), "--quiet", *TINY]) == 0
    moved = tmp_path / "moved.parquet"
    log.rename(moved)
    # the run saved its model: export needs neither the data nor a trainer
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "saved")]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "b"), "--set", f"data.dataset={moved}"]) == 2
    assert "a run is exported as it was trained: --config/--set do not apply" in capsys.readouterr().err
    shutil.rmtree(run / "model")  # a run folder from before runs saved their model: no export from checkpoints
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "checkpoints but no saved model" in err and f"csmf train --config {run / 'config.toml'} --out {run}" in err
    # the command it names saves the model from the finished checkpoints (nothing trains again); then export works
    moved.rename(log)
    assert main(["train", "--config", str(run / "config.toml"), "--out", str(run), "--quiet"]) == 0
    assert "resuming after phase train-3" in capsys.readouterr().out
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "again")]) == 0
    first, again = load_artifact(tmp_path / "saved"), load_artifact(tmp_path / "again")
    assert (first.item_vectors == again.item_vectors).all() and (first.user_vectors == again.user_vectors).all()
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no saved model (model/model.pt)" in capsys.readouterr().err


# ----- damage and concurrency: a changed byte is refused with the file named; one training per run folder ----------


def _flip_a_weight_byte(path: pathlib.Path) -> None:
    """Change one byte in the middle of the largest tensor of a torch checkpoint: torch still reads the file."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:  # torch's format: a zip whose tensors are stored uncompressed under data/
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
    torch.load(path, weights_only=True)  # still a readable checkpoint: only the digest tells


def test_a_changed_byte_in_a_checkpoint_or_a_saved_model_is_refused_naming_the_file_and_the_fix(
    sim_parquet, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", "--dataset", str(sim_parquet[0]), "--out", str(out), "--quiet", *TINY]
    assert main(argv) == 0
    metrics = (out / "metrics.json").read_text()
    last = sorted((out / "checkpoints").glob("phase-*.pt"))[-1]
    _flip_a_weight_byte(last)
    capsys.readouterr()
    assert main(argv) == 2  # resume refuses it: nothing trained, nothing overwritten
    err = capsys.readouterr().err
    assert f"{last}: damaged" in err and "delete this file to train its phase again" in err and "--overwrite" in err
    assert "other data" not in err and (out / "metrics.json").read_text() == metrics

    # export reads the saved model, which is intact; a changed byte in it (or in a file it lists) is refused
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "ok")]) == 0
    model = out / "model" / "model.pt"
    kept = model.read_bytes()
    _flip_a_weight_byte(model)
    capsys.readouterr()
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"{model}: damaged" in err and "run csmf train with the same --out" in err and "other data" not in err
    assert not (tmp_path / "a").exists()
    model.write_bytes(kept)
    inputs = out / "model" / "inputs.npz"
    data = bytearray(inputs.read_bytes())
    data[len(data) // 2] ^= 0x10
    inputs.write_bytes(bytes(data))
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "b")]) == 2
    assert f"{inputs}: a saved model file is missing or damaged: its sha256 does not match" in capsys.readouterr().err

    # a run without a saved model: export names the damaged checkpoint, not "finish training"
    import shutil

    shutil.rmtree(out / "model")
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"{last}: damaged" in err and "no saved model" not in err

    # the fix the message gives works: the phase before it is intact, and training resumes from there
    last.unlink()
    assert main(argv) == 0
    assert "resuming after phase" in capsys.readouterr().out
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "d")]) == 0


def test_a_checkpoint_from_before_the_digest_loads_with_a_note(tmp_path, caplog):
    from csmf.checkpoints import load_checkpoint, save_checkpoint

    path = tmp_path / "phase-00-pretrain.pt"
    save_checkpoint(path, {"w": torch.arange(4.0)}, {"phase": 0})
    raw = torch.load(path, weights_only=True)
    torch.save({"state": raw["state"], "meta": raw["meta"]}, path)  # what csmf wrote before the digest
    state, meta = load_checkpoint(path)
    assert torch.equal(state["w"], torch.arange(4.0)) and meta == {"phase": 0}
    (note,) = [r for r in caplog.records if r.name == "csmf.checkpoints"]  # a warning: on stderr in the command
    assert note.levelname == "WARNING" and f"{path} carries no content digest" in note.getMessage()


def test_a_second_train_on_a_run_folder_in_use_is_refused_naming_the_holder(sim_parquet, tmp_path, capsys):
    import os
    import socket

    from csmf.runfolder import RunFolderBusy, RunLock

    out = tmp_path / "run"
    argv = ["train", "--dataset", str(sim_parquet[0]), "--out", str(out), "--quiet", *TINY]
    with RunLock(out):  # another training holds it (flock: a second open file conflicts, in any process)
        for extra in ([], ["--nproc", "2"]):  # one process, or a launcher: refused before anything starts
            assert main([*argv, *extra]) == 2
            err = capsys.readouterr().err
            assert f"{out} is in use by another csmf train (pid {os.getpid()} on {socket.gethostname()}" in err
            assert "started" in err and "another --out folder" in err
        assert not (out / "checkpoints").exists()
        with pytest.raises(RunFolderBusy):
            RunLock(out).check()
    RunLock(out).check()  # released with its holder
    assert main(argv) == 0
    RunLock(out).check()  # and the training released it when it finished
