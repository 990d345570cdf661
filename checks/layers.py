#!/usr/bin/env python3
"""Check that imports follow the layering of docs/design.md, and report oversized modules.

    cli -> flows -> tasks -> {registry -> models} -> kernel

Every part is a top-level folder of the repository and installs as `atelier.<part>` (pyproject's
package-dir). The command line is the top floor: it may import every part below it, and nothing
imports it. Prefect is imported only by flows/ and tasks/ (and cli/), MLflow only by registry/ (and cli/).

usage: python3 checks/layers.py [REPO_ROOT]
Exit 1 and one line per breach; exit 0 and a summary line when the layers hold.
"""

import ast
import sys
from pathlib import Path

PARTS = ("cli", "flows", "tasks", "registry", "models", "kernel")
# what each part may import, among the parts and the framework libraries that mark a layer
ALLOWED = {
    "cli": {"flows", "tasks", "registry", "models", "kernel", "prefect", "mlflow"},
    "flows": {"tasks", "kernel", "prefect"},
    "tasks": {"registry", "models", "kernel", "prefect"},
    "registry": {"models", "kernel", "mlflow"},
    "models": {"kernel"},
    "kernel": set(),
}
LAYER_LIBS = {"prefect", "mlflow"}
ROOT_PACKAGE = "atelier"
MAX_LINES = 500


def part_of(path: Path, root: Path) -> str | None:
    first = path.relative_to(root).parts[0]
    return first if first in PARTS else None


def imported_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == ROOT_PACKAGE:  # from atelier import flows
                names.update(f"{ROOT_PACKAGE}.{a.name}" for a in node.names)
    return names


def layer_of(name: str) -> str | None:
    """The part or layer library an imported module belongs to (atelier.flows.batch -> flows)."""
    head, _, rest = name.partition(".")
    if head == ROOT_PACKAGE:
        part = rest.partition(".")[0]
        return part if part in PARTS else None
    if head in PARTS:
        return f"bare:{head}"  # the pre-0.2 top-level name: always a breach
    return head if head in LAYER_LIBS else None


def main(root: Path) -> int:
    breaches, files = [], 0
    for path in sorted(root.rglob("*.py")):
        if any(p in (".venv", "tests", "benchmarks", "build") or p.startswith(".") for p in path.relative_to(root).parts):
            continue
        part = part_of(path, root)
        if part is None:
            continue
        files += 1
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.count("\n") + 1
        rel = path.relative_to(root)
        if lines > MAX_LINES:
            breaches.append(f"{rel}: {lines} lines (over {MAX_LINES}): split it by responsibility")
        for layer in sorted(filter(None, map(layer_of, imported_names(ast.parse(text, str(path)))))):
            if layer.startswith("bare:"):
                breaches.append(f"{rel}: imports {layer[5:]} by its bare name: write atelier.{layer[5:]}")
            elif layer != part and layer not in ALLOWED[part]:
                breaches.append(f"{rel}: {part}/ imports {layer}")
    for b in breaches:
        print(b)
    print(f"layers: {len(breaches)} breaches in {files} modules")
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]).resolve()))
