"""The release path: `csmf --version` and the CHANGELOG follow pyproject.toml's version; `python -m build` makes an
sdist and a wheel that holds the package data (JD files, shipped selections, the scenario page, presets) and stays
small; the wheel installs into a fresh virtual environment, where `csmf --version` and a tiny training run from it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from csmf.cli import main
from csmf.data.jd import JD_FILES, jd_raw_matrices

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
WHEEL_MAX_MB = 20  # the JD files are ~0.6 MB compressed; a wheel near this would carry something it should not

needs_build = pytest.mark.skipif(
    importlib.util.find_spec("build") is None,
    reason="python -m build needs the build package (in the test extra): pip install -e '.[test]'",
)

# a minute of work from the venv: a 200-user simulated log, a small model, one epoch, one configuration
TINY_TRAIN = [
    "train", "--dataset", "sim", "--out", "run", "--quiet",
    "--set", "sim.n_users=200", "--set", "sim.n_items=100",
    "--set", "model.user_hidden=16", "--set", "model.id_dim=8", "--set", "model.history_dim=8",
    "--set", "model.dim=8", "--set", "train.max_epochs=1", "--set", "train.batch_size=256",
    "--set", "select.candidates=",
]  # fmt: skip

# run by the venv's own python from a folder outside the source tree: where csmf comes from and what it ships
PROBE = """
import json, csmf
from importlib import resources
from csmf.data.jd import jd_raw_matrices
from csmf.selection import SHIPPED
page = resources.files("csmf.serving").joinpath("static/index.html").read_text()
print(json.dumps({"file": csmf.__file__, "version": csmf.__version__, "page_chars": len(page),
                  "selections": sorted(p.name for p in SHIPPED.glob("*.json")),
                  "jd_pairs": {k: int(m.nnz) for k, m in jd_raw_matrices().items()}}))
"""


def test_version_flag_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"csmf {VERSION}"
    assert metadata.version("csmf") == VERSION, "the installed metadata is stale: pip install -e . again"


def test_changelog_has_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert f"## [{VERSION}]" in text, f"CHANGELOG.md has no section for pyproject.toml's version {VERSION}"


def packaged_files() -> list[str]:
    """The package-data files of the source tree, as paths inside the package (csmf/...)."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["csmf"]
    base = ROOT / "src" / "csmf"
    return sorted(str(p.relative_to(base.parent)) for pattern in patterns for p in base.glob(pattern))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """`python -m build` of the source tree: the sdist, then the wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, f"python -m build failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"csmf-{VERSION}-py3-none-any.whl"], wheels
    assert [s.name for s in sdists] == [f"csmf-{VERSION}.tar.gz"], sdists
    return wheels[0], sdists[0]


@needs_build
def test_wheel_and_sdist_hold_the_package_data(built):
    wheel, sdist = built
    shipped = packaged_files()
    wanted = {f"csmf/datasets/jd/{stem}.txt.xz" for stem in JD_FILES}
    wanted |= {"csmf/datasets/jd/ATTRIBUTION.md", "csmf/serving/static/index.html"}
    assert wanted <= set(shipped), f"the package-data patterns in pyproject.toml miss {wanted - set(shipped)}"
    assert any(name.startswith("csmf/datasets/selections/") for name in shipped), "no shipped selection"
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [f for f in shipped if f not in names], f"package data missing from {wheel.name}"
    assert "csmf/cli.py" in names and f"csmf-{VERSION}.dist-info/entry_points.txt" in names
    in_sdist = set(tarfile.open(sdist).getnames())
    assert not [f for f in shipped if f"csmf-{VERSION}/src/{f}" not in in_sdist], f"package data missing from {sdist}"
    size_mb = wheel.stat().st_size / 2**20
    print(f"{wheel.name}: {size_mb:.2f} MB")  # 0.92 MB at 0.1.0
    assert size_mb < WHEEL_MAX_MB, f"{wheel.name} is {size_mb:.1f} MB (over {WHEEL_MAX_MB} MB): what is in it?"


def venv_env() -> dict[str, str]:
    """This environment without anything that would put the source tree or this venv on the new one's path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(argv: list, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=venv_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
    return done


@needs_build
def test_wheel_installs_and_trains_in_a_fresh_venv(built, tmp_path):
    wheel, _ = built
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    run([sys.executable, "-m", "venv", venv], tmp_path, 300)  # its own site-packages: nothing of this one
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    bin_ = venv / "bin"
    # the wheel and its dependencies from the configured index, with this environment's torch (an unpinned torch
    # pulls a multi-GB CUDA build); no byte-compiling of torch's thousands of modules, which the test does not need
    started = time.perf_counter()
    install = ["install", "--no-input", "--no-compile", wheel, f"torch=={metadata.version('torch')}"]
    run([bin_ / "python", "-m", "pip", *install], tmp_path, 900)
    print(f"installed {wheel.name} with its dependencies in {time.perf_counter() - started:.0f} s")

    assert run([bin_ / "csmf", "--version"], work, 120).stdout.strip() == f"csmf {VERSION}"
    probe = json.loads(run([bin_ / "python", "-c", PROBE], work, 300).stdout.strip().splitlines()[-1])
    assert Path(probe["file"]).is_relative_to(venv), f"csmf was imported from {probe['file']}, not the venv"
    assert probe["version"] == VERSION and probe["page_chars"] > 1000
    shipped_selections = sorted(p.name for p in (ROOT / "src/csmf/datasets/selections").glob("*.json"))
    assert probe["selections"] == shipped_selections
    assert probe["jd_pairs"] == {k: int(m.nnz) for k, m in jd_raw_matrices().items()}

    run([bin_ / "csmf", *TINY_TRAIN], work, 600)
    result = json.loads((work / "run" / "metrics.json").read_text())
    assert result["dataset"] == "sim" and set(result["metrics"]) == {"exposure", "click", "conversion"}
    for stage, metrics in result["metrics"].items():
        assert 0 < metrics["recall@50"] <= 1, (stage, metrics)
    assert (work / "run" / "model").is_dir()
