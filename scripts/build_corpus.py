"""Build a small English text corpus from what every Python installation carries: the standard library's docstrings.

    python scripts/build_corpus.py [-o data/python_docs.jsonl] [--max-mb 4]

One JSON line per module, `{"text": ..., "module": ...}`: the module's docstring, then the docstring of each class
and function under a `name(arguments)` heading, in source order. Modules are taken in sorted path order, tests and
third-party packages left out, so the file is the same on every machine with the same Python version (another
version gives a slightly different corpus). No network, nothing installed. The file is written whole or not at all.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo",
             "ensurepip", "venv", "config-3", "__phello__"}
MIN_CHARS = 200


def module_files(stdlib: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        files += [Path(root) / n for n in sorted(names) if n.endswith(".py")]
    return sorted(files)


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    every = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
    args = [a.arg for a in every if a.arg not in ("self", "cls")]
    if node.args.vararg:
        args.append("*" + node.args.vararg.arg)
    if node.args.kwarg:
        args.append("**" + node.args.kwarg.arg)
    return f"{node.name}({', '.join(args)})"


def document(path: Path, module: str) -> str | None:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    parts = [f"Module {module}"]
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(f"class {prefix}{node.name}\n{doc}")
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(f"{prefix}{signature(node)}\n{doc}")

    visit(tree.body, "")
    text = "\n\n".join(parts)
    return text if len(text) >= MIN_CHARS else None


def build(stdlib: Path, max_bytes: int) -> list[dict[str, str]]:
    records, size = [], 0
    for path in module_files(stdlib):
        rel = path.relative_to(stdlib).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        text = document(path, module)
        if text is None:
            continue
        line_bytes = len(json.dumps({"text": text, "module": module}).encode())
        if size + line_bytes > max_bytes:
            break
        records.append({"text": text, "module": module})
        size += line_bytes
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="data/python_docs.jsonl", help="the jsonl file to write")
    parser.add_argument("--max-mb", type=float, default=4.0, help="stop before the file exceeds this size (MB)")
    args = parser.parse_args(argv)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        print(f"build_corpus: the standard library is not at {stdlib}; cannot build the corpus", file=sys.stderr)
        return 2
    records = build(stdlib, int(args.max_mb * 1e6))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    tmp.replace(out)
    print(f"wrote {out}: {len(records)} modules, {out.stat().st_size / 1e6:.1f} MB, from {stdlib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
