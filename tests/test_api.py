"""The public API: the README's Python example runs as written, and a saved model scores as the original."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import csmf

README = Path(__file__).resolve().parents[1] / "README.md"


pytestmark = pytest.mark.usefixtures("one_thread")


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- python-api[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README has no python-api block"
    return match.group(1)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert "recall@50" in capsys.readouterr().out
    assert (tmp_path / "my-model" / "model.pt").exists() and (tmp_path / "my-artifact" / "manifest.json").exists()
    assert scope["top"].shape == (3, 10)


def test_the_api_names_resolve_and_unknown_names_fail():
    assert set(csmf.__all__) >= {"CSMF", "Config", "evaluate", "export_model", "load_dataset", "override"}
    for name in csmf.__all__:
        assert getattr(csmf, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        csmf.nope  # noqa: B018


def test_growing_a_model_is_public_and_no_public_name_is_shadowed_by_a_submodule():
    import importlib
    import pkgutil

    # importing a submodule binds it on the package, so a public name equal to one (csmf.refresh) would turn from
    # the function into the module once anything imported csmf.refresh
    submodules = {m.name for m in pkgutil.iter_modules(csmf.__path__)}
    assert not set(csmf.__all__) & submodules, set(csmf.__all__) & submodules
    extend, refresh = importlib.import_module("csmf.extend"), importlib.import_module("csmf.refresh")
    assert csmf.extend_model is extend.extend_model and csmf.refresh_model is refresh.refresh_model


@pytest.fixture(scope="module")
def small():
    cfg = csmf.override(csmf.Config(), ["data.dataset=sim", "sim.n_users=200", "sim.n_items=150", "model.dim=8",
                                        "train.max_epochs=1"])  # fmt: skip
    return cfg, csmf.load_dataset(cfg)


@pytest.mark.parametrize("name", ["csmf", "naive-ft", "packnet", "single-click"])
def test_a_saved_model_loads_and_scores_bit_identically(small, tmp_path, name):
    cfg, data = small
    model = csmf.CSMF.variant(name, cfg).fit(data)
    loaded = csmf.CSMF.load(model.save(tmp_path / name))
    users = np.arange(0, data.n_users, 7)
    assert loaded.name == name and loaded.num_params() == model.num_params()
    for stage in model.served(data):
        assert torch.equal(loaded.score(users, stage), model.score(users, stage)), stage
    weights = {s: 1.0 + i for i, s in enumerate(model.served(data))}
    assert torch.equal(loaded.user_vectors(users, weights), model.user_vectors(users, weights))
    assert torch.equal(loaded.item_vectors(), model.item_vectors())


def test_a_saved_model_folder_is_checked_when_read(small, tmp_path):
    from csmf.checkpoints import CheckpointError

    cfg, data = small
    folder = csmf.CSMF(cfg).fit(data).save(tmp_path / "m")
    (folder / "inputs.npz").write_bytes(b"not an npz")
    with pytest.raises(CheckpointError, match="missing or damaged"):
        csmf.CSMF.load(folder)
    with pytest.raises(CheckpointError, match="no model.pt"):
        csmf.CSMF.load(tmp_path / "empty")


def test_the_config_reference_is_current():
    from csmf.configdoc import reference

    docs = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert docs.read_text() == reference(), "regenerate it: python -m csmf.configdoc > docs/config.md"
    assert "| `cascade.prune` | Literal['cpp', 'fixed', 'none'] | `'cpp'` | 'cpp', 'fixed', 'none' |" in reference()


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from csmf.progress import bar

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # piped or logged: no bar even when asked
    assert bar(range(3), True).disable and bar(range(3), False).disable

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not bar(range(3), True).disable and bar(range(3), False).disable


def test_importing_csmf_makes_openmp_wait_passively_unless_the_caller_chose():
    """Spinning OpenMP threads made training ~15x slower on a busy machine (csmf trainspeed): csmf sets
    OMP_WAIT_POLICY=PASSIVE on import, before torch or faiss start OpenMP, and keeps a caller's own choice."""
    import os
    import subprocess
    import sys

    probe = "import os, csmf; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "ACTIVE"
