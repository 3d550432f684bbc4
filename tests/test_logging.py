"""Logging (issue 28): library code logs on the `csmf.*` loggers and never prints; the command shows those records
as it printed them (INFO on stdout, notes and errors on stderr), `--log-level` filters them, and `csmf serve
--log-format json` writes one JSON object a line."""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from test_serving import _free_port, small_artifact

import csmf
from csmf.cli import main
from csmf.cli_output import cli_logging

SRC = Path(csmf.__file__).parent
OUTPUT_MODULE = SRC / "cli_output.py"  # the one place that writes the command's lines


def test_library_code_has_no_print_and_one_logger_per_module_under_csmf():
    printing, loggers = [], []
    for path in sorted(SRC.rglob("*.py")):
        if path == OUTPUT_MODULE:
            continue
        text = path.read_text()
        where = path.relative_to(SRC)
        # `grep -rnw "print(" src/csmf` (the word: `fingerprint(` is not a print), and print passed as a value
        printing += [f"{where}:{n}" for n, line in enumerate(text.splitlines(), 1) if re.search(r"\bprint\(", line)]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Name) and node.id == "print":
                printing.append(f"{where}:{node.lineno} (print as a value)")
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and ast.unparse(node.value.func) == "logging.getLogger"):  # fmt: skip
                loggers.append((str(where), ast.unparse(node.value.args[0]) if node.value.args else "(root)"))
    assert not printing, "print in library code (log on logging.getLogger(__name__) instead):\n" + "\n".join(printing)
    assert loggers and all(name == "__name__" for _, name in loggers), loggers  # csmf.<module>, under csmf


def test_the_library_logs_its_notes_and_lines_on_the_csmf_loggers(tmp_path, caplog):
    from csmf.checkpoints import load_checkpoint, save_checkpoint
    from csmf.config import ServeConfig
    from csmf.models.saving import _check_files
    from csmf.serving.artifact import load_artifact
    from csmf.serving.workers import hnsw_graph

    caplog.set_level(logging.INFO, logger="csmf")
    path = tmp_path / "phase-00-pretrain.pt"
    save_checkpoint(path, {"w": torch.arange(4.0)}, {"phase": 0})
    raw = torch.load(path, weights_only=True)
    torch.save({"state": raw["state"], "meta": raw["meta"]}, path)  # what csmf wrote before the digest
    load_checkpoint(path)
    _check_files(tmp_path, {})  # a model folder saved before the file digests
    where = tmp_path / "items.hnsw"
    hnsw_graph(load_artifact(small_artifact(tmp_path / "a", n_items=60)), ServeConfig(index="hnsw"), where)
    seen = {(r.name, r.levelname, r.getMessage().split(":")[0]) for r in caplog.records}
    assert ("csmf.checkpoints", "WARNING", "csmf") in seen and f"{path} carries no content digest" in caplog.text
    assert ("csmf.models.saving", "WARNING", "csmf") in seen and "without file digests" in caplog.text
    assert ("csmf.serving.workers", "INFO", "HNSW graph") in seen and f"writing {where}" in caplog.text


def test_the_command_writes_info_on_stdout_and_warnings_on_stderr_and_restores_the_logger(capsys):
    package = logging.getLogger("csmf")
    before = (package.level, package.propagate, list(package.handlers))
    with cli_logging("info"):
        logging.getLogger("csmf.some.module").info("a line\nand its second line")
        logging.getLogger("csmf.other").warning("csmf: note: a note")
        logging.getLogger("csmf.other").debug("not shown")
    assert capsys.readouterr() == ("a line\nand its second line\n", "csmf: note: a note\n")  # as print wrote them
    with cli_logging("warning", "json"):
        logging.getLogger("csmf.x").info("silenced")
        logging.getLogger("csmf.x").error("broke: %s", "why")
    out, err = capsys.readouterr()
    entry = json.loads(err)
    assert out == "" and set(entry) == {"time", "level", "logger", "message"}
    assert (entry["level"], entry["logger"], entry["message"]) == ("ERROR", "csmf.x", "broke: why")
    assert (package.level, package.propagate, list(package.handlers)) == before


def test_log_level_warning_silences_the_info_lines_of_a_command(tmp_path, capsys):
    simulate = ["simulate", "--out", str(tmp_path / "s.csv"), "--users", "30", "--items", "20", "--quiet"]
    assert main(simulate) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 's.csv'}: ")
    for argv in ([*simulate, "--log-level", "warning"], ["--log-level", "warning", *simulate]):  # after or before
        assert main(argv) == 0
        assert capsys.readouterr() == ("", ""), argv
    # errors still show at the strictest level, in the same words
    assert main(["--log-level", "error", *simulate, "--set", "sim.n_users=many"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("csmf: error: ") and "sim.n_users" in err


def test_a_log_level_given_before_train_reaches_the_launched_processes(tmp_path, monkeypatch):
    from csmf import distributed

    launched = []
    monkeypatch.setattr(distributed, "launch", lambda nproc, args: launched.append(args) or 0)
    out = str(tmp_path / "run")
    assert main(["--log-level", "warning", "train", "--dataset", "sim", "--nproc", "2", "--out", out]) == 0
    assert launched == [["--dataset", "sim", "--out", out, "--log-level", "warning"]]


def _json_lines(text: str) -> list[dict]:
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]  # each line must parse
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries), entries
    return entries


def test_serve_log_format_json_writes_one_json_object_a_line_in_every_process(tmp_path):
    path = small_artifact(tmp_path / "a")
    port = _free_port()
    serve = [sys.executable, "-m", "csmf.cli", "serve", "--artifact", str(path), "--port", str(port),
             "--log-format", "json"]  # fmt: skip
    first = subprocess.Popen([*serve, "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, up = time.time() + 90, False
        while time.time() < deadline and not up and first.poll() is None:
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.HTTPError:
                time.sleep(0.3)
        assert up, "the service did not start"
        # a second service on the same port: uvicorn's own error line, in JSON too
        second = subprocess.run(serve, capture_output=True, text=True, timeout=90)
    finally:
        first.terminate()
        out, err = first.communicate(timeout=30)
    started = _json_lines(out)
    assert [e["logger"] for e in started] == ["csmf.serving.workers"]
    assert started[0]["level"] == "INFO" and started[0]["message"].startswith("serving with 2 worker processes")
    assert _json_lines(err) == []  # the workers and the parent wrote nothing else, and nothing in another form
    assert second.returncode != 0
    assert _json_lines(second.stdout)[0]["message"].startswith("serving 50 items")
    errors = _json_lines(second.stderr)
    assert any(e["logger"] == "uvicorn.error" and e["level"] == "ERROR" for e in errors), errors
