"""Which way the imports run (DESIGN.md): import-linter's contracts in pyproject.toml hold, they say what DESIGN.md
says, and no module of moe_model imports itself back through others (no import cycle)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def contracts() -> list[dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config["root_package"] == "moe_model"
    return config["contracts"]


def forbidden(source: str) -> set[str]:
    """What the forbidden contracts keep away from `source`."""
    return {f for c in contracts() if c["type"] == "forbidden" and source in c["source_modules"]
            for f in c["forbidden_modules"]}


def test_the_contracts_encode_designs_direction():
    parts = {f"moe_model.{p}" for p in ("parallel", "train", "estimate", "calibrate", "report", "cli")}
    for model in ("configuration", "modeling", "routing", "grouped_ffn"):
        assert forbidden(f"moe_model.{model}") >= parts, model
    assert forbidden("moe_model.estimate") >= parts - {"moe_model.estimate"}
    assert forbidden("moe_model.parallel") >= {f"moe_model.{p}" for p in ("train", "estimate", "calibrate", "cli")}
    assert forbidden("moe_model.report") >= {f"moe_model.{p}" for p in ("train", "calibrate", "cli")}
    layers = [c for c in contracts() if c["type"] == "layers"]
    assert layers and layers[0]["layers"][0] == "moe_model.cli"  # nothing imports the command line


def test_lint_imports_keeps_every_contract():
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"Contracts: {len(contracts())} kept, 0 broken." in done.stdout


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every group of modules that import each other, directly or through others (Tarjan's strongly connected
    components of size > 1, or a module importing itself); grimp finds chains between given modules, not cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(root: str) -> None:  # iterative: the import graph is deeper than a comfortable recursion
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[module] = min(low[module], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[module])
            if low[module] == index[module]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == module:
                        break
                if len(group) > 1 or module in graph.find_modules_directly_imported_by(module):
                    found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_among_the_packages_modules():
    graph = grimp.build_graph("moe_model", cache_dir=None)
    assert len(graph.modules) > 30
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(name)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    graph.add_import(importer="a.z", imported="a.x")
    assert cycles(graph) == [["a.x", "a.y", "a.z"]]
