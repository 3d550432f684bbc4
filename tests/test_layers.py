"""The import graph runs one way, and has no circle.

Layers: the core never imports serving or the experiments, serving never imports the experiments, and the
contract and evaluation never import a model. Circles: no file reaches itself through imports, counting an
import inside a function (a function-local import only hides a circle until the function runs) and counting a
package's __init__ as a file: `from csmf.data import context` reads the package csmf.data first, so inside that
package it closes a circle through the __init__ that imports the submodules. Importing `csmf.a.b.c` also runs the
__init__ of every package on the way (csmf.a, csmf.a.b) unless it already ran: for a file inside csmf.a that package
is already being imported, so only the packages the importing file does not sit in count. Checked with ast.
"""

from __future__ import annotations

import ast
from pathlib import Path

import csmf

SRC = Path(csmf.__file__).parent
SERVING = {"serving"}
EXPERIMENTS = {"experiments"}
INTERFACE = {"cli", "cli_output", "train_command", "torchrun_entry"}
BELOW_MODELS = {"retriever", "evaluation", "metrics"}
ROOT = "csmf"  # the package's own __init__: core (its public API is imported by name on first use)


def module_of(path: Path, src: Path = SRC) -> str:
    """Dotted name under csmf of a file: data/cache.py -> data.cache, data/__init__.py -> data, __init__ -> csmf."""
    parts = path.relative_to(src).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or ROOT


def packages_above(module: str) -> set[str]:
    """The packages whose __init__ runs before a module: data.cache -> {data}; the root csmf is left out."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def targets(node: ast.AST, modules: set[str], importer: str = "") -> set[str]:
    """The files an import statement in `importer` runs: a named module, or a package's __init__ and the
    submodules named, and the __init__ of each package above them that `importer` does not itself sit in."""
    found = set()
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "csmf" and not node.level:
        base = node.module.removeprefix("csmf").lstrip(".") or ROOT
        found.add(base)
        for alias in node.names:
            sub = alias.name if base == ROOT else f"{base}.{alias.name}"
            if sub in modules:
                found.add(sub)
    elif isinstance(node, ast.Import):
        found |= {a.name.removeprefix("csmf").lstrip(".") for a in node.names if a.name.startswith("csmf.")}
    for module in list(found):
        found |= packages_above(module) - packages_above(importer) - {importer}
    return {m for m in found if m in modules}


def imports(src: Path = SRC) -> dict[str, set[str]]:
    files = {module_of(p, src): p for p in src.rglob("*.py")}
    modules = set(files)
    graph = {}
    for module, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            found |= targets(node, modules, module)
        graph[module] = found - {module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one file (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top in INTERFACE:
        return "interface"
    if top in SERVING:
        return "serving"
    if top in EXPERIMENTS:
        return "experiments"
    return "core"


ALLOWED = {
    "core": {"core"},
    "serving": {"core", "serving"},
    "experiments": {"core", "experiments"},
    "interface": {"core", "serving", "experiments", "interface"},
}


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    wrong = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, found in imports().items()
        for target in found
        if layer(target) not in ALLOWED[layer(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_contract_and_evaluation_import_no_model():
    wrong = [
        f"{module} imports {target}"
        for module, found in imports().items()
        if module in BELOW_MODELS
        for target in found
        if target.split(".")[0] in ("models", "backbones") or target in ("cascade", "stage_loss", "trained")
    ]
    assert not wrong, "\n".join(wrong)


def test_no_file_reaches_itself_through_imports():
    found = circles(imports())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(group) for group in found)


def test_the_check_sees_a_function_local_import_and_a_circle_through_a_package(tmp_path):
    tree = ast.parse("def f():\n    from csmf.experiments.bench import run_model\n")
    assert [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] == ["csmf.experiments.bench"]
    assert layer("experiments.bench") == "experiments" and "experiments" not in ALLOWED["core"]
    # a toy tree: pkg/__init__ imports pkg.a, which imports a name of the package (a circle) and, inside a
    # function, b, which imports a at module level (a second circle, through a function-local import)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from csmf.pkg.a import f\n")
    (tmp_path / "pkg" / "a.py").write_text("from csmf.pkg import helper\n\ndef f():\n    from csmf.b import g\n")
    (tmp_path / "b.py").write_text("from csmf.pkg.a import f\n")
    (tmp_path / "c.py").write_text("from csmf.pkg import a\n")  # the package and its submodule, no circle
    graph = imports(tmp_path)
    assert graph["pkg.a"] == {"pkg", "b"} and graph["c"] == {"pkg", "pkg.a"}
    assert circles(graph) == [["b", "pkg", "pkg.a"]]
    # a package's __init__ runs on the way to its submodule: q.x imports pkg2.y, whose package __init__
    # imports q.x back (a circle no name in the import shows); inside pkg2, pkg2.z importing pkg2.y adds no edge
    for folder, text in {"pkg2": "from csmf.q.x import h\n", "q": ""}.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text(text)
    (tmp_path / "pkg2" / "y.py").write_text("")
    (tmp_path / "pkg2" / "z.py").write_text("from csmf.pkg2.y import k\n")
    (tmp_path / "q" / "x.py").write_text("from csmf.pkg2.y import k\n")
    graph = imports(tmp_path)
    assert graph["q.x"] == {"pkg2", "pkg2.y"} and graph["pkg2.z"] == {"pkg2.y"}
    assert ["pkg2", "q.x"] in circles(graph)
    assert circles({"x": {"y"}, "y": set()}) == []
