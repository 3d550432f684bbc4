"""The import graph runs one way: the core never imports serving or the experiments, serving never imports
the experiments, and the contract and evaluation never import a model (checked on the source with ast, so
an import inside a function counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import csmf

SRC = Path(csmf.__file__).parent
SERVING = {"serving"}
EXPERIMENTS = {"experiments"}
INTERFACE = {"cli", "demo", "train", "__init__"}
BELOW_MODELS = {"retriever", "evaluation", "metrics"}


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts)


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top in INTERFACE:
        return "interface"
    if top in SERVING:
        return "serving"
    if top in EXPERIMENTS:
        return "experiments"
    return "core"


def imports() -> dict[str, set[str]]:
    graph = {}
    for path in SRC.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("csmf"):
                found.add(node.module.removeprefix("csmf").lstrip("."))
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("csmf").lstrip(".") for a in node.names if a.name.startswith("csmf.")}
        graph[module_of(path)] = {m for m in found if m}
    return graph


ALLOWED = {
    "core": {"core"},
    "serving": {"core", "serving"},
    "experiments": {"core", "experiments"},
    "interface": {"core", "serving", "experiments", "interface"},
}


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    wrong = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in imports().items()
        for target in targets
        if layer(target) not in ALLOWED[layer(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_contract_and_evaluation_import_no_model():
    wrong = [
        f"{module} imports {target}"
        for module, targets in imports().items()
        if module in BELOW_MODELS
        for target in targets
        if target.startswith("models") or target in ("cascade", "graph", "towers")
    ]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    tree = ast.parse("def f():\n    from csmf.experiments.bench import run_model\n")
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert modules == ["csmf.experiments.bench"] and layer("experiments.bench") == "experiments"
    assert "experiments" not in ALLOWED["core"] and layer("serving.export") == "serving" and layer("cascade") == "core"
