"""The docs site (mkdocs.yml, docs/): it builds with `mkdocs build --strict` (no broken link or anchor, every page in
the nav, no docstring the API reference cannot render), and every name in `csmf.__all__` has a docstring of its own
that the built API page shows."""

from __future__ import annotations

import html
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import csmf

ROOT = Path(__file__).resolve().parents[1]


def _own_docstring(obj: object) -> str:
    """The docstring written for `obj`: not one inherited from a base class, nor the signature a dataclass makes up."""
    doc = vars(obj).get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    doc = inspect.cleandoc(doc or "")
    if isinstance(obj, type) and doc.startswith(f"{obj.__name__}("):  # @dataclass's stand-in for a missing docstring
        return ""
    return doc


def _text(fragment: str) -> str:
    """What a reader sees of an HTML fragment: tags dropped (inline ones such as <code> add no space), entities
    decoded, runs of white space as one space."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", fragment))).strip()


@pytest.mark.parametrize("name", csmf.__all__)
def test_every_public_name_has_a_docstring_of_its_own(name: str) -> None:
    obj = getattr(csmf, name)
    assert _own_docstring(obj), f"csmf.{name} ({obj.__module__}) has no docstring: write one where it is defined"


def _nav_pages(nav: list) -> list[str]:
    pages: list[str] = []
    for entry in nav:
        target = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(target) if isinstance(target, list) else [target]
    return pages


def test_the_docs_site_builds_strict_and_its_api_page_shows_every_public_name(tmp_path: Path) -> None:
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python") if not _importable(m)]
    if missing:
        pytest.skip(f"the docs site needs {', '.join(missing)}: pip install -e '.[docs]' (the test extra has them)")
    import yaml  # mkdocs depends on PyYAML

    site = tmp_path / "site"  # outside the repository: a build leaves nothing in the working tree
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor, not a build finding
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    for page in _nav_pages(nav):
        built = site / ("index.html" if page == "index.md" else f"{page.removesuffix('.md')}/index.html")
        assert built.is_file(), f"the nav's {page} was not built into {built}"

    api = (site / "api" / "index.html").read_text()
    for name in csmf.__all__:
        obj = getattr(csmf, name)
        anchor = f'id="{obj.__module__}.{name}"'  # mkdocstrings' heading of the object, by its defining module
        assert anchor in api, f"docs/api.md has no `::: {obj.__module__}.{name}` entry for csmf.{name}"
        start = api.index(anchor)
        # the object's own block: from its heading to the next object's (a class's members come after its docstring)
        end = api.find('class="doc doc-heading"', api.index("</h", start))
        shown = _text(api[start : end if end != -1 else len(api)])
        first_line = re.sub(r"\s+", " ", _own_docstring(obj).splitlines()[0].replace("`", "")).strip()
        assert first_line in shown, f"csmf.{name}'s docstring ({first_line!r}) is not on the API page: {shown[:300]!r}"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False
