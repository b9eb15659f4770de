"""Print the import graph between tandem's packages (tandem.X -> tandem.Y), from the source.

Usage: python scripts/import_graph.py [ROOT]   (ROOT: the folder that holds tandem/, default .)
Module-level and function-level imports both count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def edges(root: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in sorted((root / "tandem").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        src = package_of(module)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("tandem.") and package_of(name) != src:
                    graph[src].add(package_of(name))
    return graph


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    graph = edges(root)
    for src in sorted(graph):
        print(f"{src} -> {', '.join(sorted(graph[src]))}")


if __name__ == "__main__":
    main()
