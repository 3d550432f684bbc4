"""The config reference (docs/config.md), generated from csmf.config itself: every section and field with
its type, default, allowed values (the Literal choices or the section's RULES) and its comment.

    python -m csmf.configdoc > docs/config.md     (tests/test_api.py checks the file is current)
"""

from __future__ import annotations

import ast
import dataclasses
import sys
import typing
from pathlib import Path

from csmf import config


def _comments(lines: list[str], node: ast.AnnAssign) -> str:
    """The comment lines right above a field and the comment at the end of its line."""
    above, row = [], node.lineno - 2
    while row >= 0 and lines[row].strip().startswith("#"):
        above.insert(0, lines[row].strip().lstrip("#").strip())
        row -= 1
    line = lines[node.lineno - 1]
    trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
    return " ".join(part for part in (*above, trailing) if part)


def _allowed(cls: type, name: str, hint) -> str:
    args = typing.get_args(hint)
    literal = hint if typing.get_origin(hint) is typing.Literal else (args[0] if args else None)
    if literal is not None and typing.get_origin(literal) is typing.Literal:
        return ", ".join(repr(a) for a in typing.get_args(literal))
    rule = getattr(cls, "RULES", {}).get(name)
    return rule[1] if rule else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference() -> str:
    source = Path(config.__file__).read_text()
    lines = source.splitlines()
    classes = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}
    out = [
        "# Configuration reference",
        "",
        "Generated from `src/csmf/config.py` by `python -m csmf.configdoc` (do not edit by hand). Set a field "
        "with `--set section.field=value` or in a TOML file's `[section]` (`--config file.toml`); a value outside "
        "its allowed values fails before any work starts, naming the key.",
        "",
        "| key | type | default | allowed | meaning |",
        "|---|---|---|---|---|",
    ]
    top = classes["Config"]
    for node in top.body:
        if isinstance(node, ast.AnnAssign) and node.target.id == "seed":
            out.append(f"| `seed` | int | {ast.unparse(node.value)} | | {_cell(_comments(lines, node))} |")
    for field in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[field.name]
        if not dataclasses.is_dataclass(cls):
            continue
        hints = typing.get_type_hints(cls)
        out += ["", f"## [{field.name}]", ""]
        doc = ast.get_docstring(classes[cls.__name__])
        if doc:
            out += [doc.replace("\n", " "), ""]
        out += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for node in classes[cls.__name__].body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            name = node.target.id
            if name not in hints or name in ("SECTION", "RULES"):
                continue
            default = ast.unparse(node.value) if node.value is not None else ""
            cells = [f"`{field.name}.{name}`", ast.unparse(node.annotation), f"`{default}`",
                     _allowed(cls, name, hints[name]), _comments(lines, node)]  # fmt: skip
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # the document itself on stdout (> docs/config.md), not a log line
    sys.stdout.write(reference())
