"""The package's import graph has no cycle; output names come from one module."""

from __future__ import annotations

import ast
from pathlib import Path

import bids_llm_encode

PKG = Path(bids_llm_encode.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports, at module level or inside functions (all of them)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for a in node.names:  # "from . import stimulus" imports a module
                    targets.append(f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod)
            for t in targets:
                while t and t not in mods:  # "pkg.mod.attr" -> "pkg.mod"
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_walker_finds_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    g = import_graph()
    assert "bids_llm_encode.bids.images" in g["bids_llm_encode.workflows.report"]
    assert "bids_llm_encode.workflows.stimulus" in g["bids_llm_encode.workflows.participant"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_output_names_come_from_one_module():
    """Only bids/outputs.py composes output paths (OutputFiles + DerivativesWriter)."""
    import re

    composing = re.compile(r"\.(story_path|group_path|report_path|group_report_path|config_path)\(|"
                           r"writer\.path\(|_statmap\.nii|_mask\.nii")
    offenders = []
    for name, path in _modules().items():
        if name in ("bids_llm_encode.bids.outputs", "bids_llm_encode.bids.inputs") or ".demo" in name:
            continue  # inputs.py names fMRIPrep's *input* files in messages; the demo writes a dataset
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if composing.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
    assert offenders == []
