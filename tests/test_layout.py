"""The package layout: the import graph of src/phiforge, built with `ast`, has no cycles between modules and no
module imports a `_private` name from another package.

Every import that can run is an edge: top-level ones and those deferred into a function body (a deferred import
hides a cycle, it does not remove it); those under `if TYPE_CHECKING:` are not (they never run). A package is a
first-level folder of phiforge (`phiforge.io`, `phiforge.data`, ...); a module at the root (`phiforge.cli`) is its
own package. The last test keeps the root small: the architecture is the folder tree.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import phiforge

SRC = Path(phiforge.__file__).resolve().parent

# Edges (importer, imported) allowed to close a cycle until the branch that removes them is merged, each with the
# branch; a fixed edge must leave this list (checked below). Empty: the model <-> native_decode import each other
# only under TYPE_CHECKING on one side, which never runs (issue18a moves the decode plan out of the model anyway).
EXPECTED_UNTIL_MERGED: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("phiforge", *path.relative_to(SRC).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import that can run, deferred ones in function bodies included (they are real dependencies, only
    later), never those under `if TYPE_CHECKING:` (its `else:` still runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module -> the phiforge modules it imports, [(importer, module, private name)])."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in modules]
            else:
                if node.level:  # relative: resolve against this module's package
                    parts = package.split(".")
                    base = parts[: len(parts) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("phiforge"):
                    continue
                assert target in modules, f"{path}:{node.lineno}: imports {target}, which is no module of phiforge"
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:  # `from phiforge.data import jsonl` imports a module
                        targets.append(sub)
                    else:
                        targets.append(target)
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            private.append((name, target, alias.name))
            edges[name].update(t for t in targets if t != name)
    return edges, private


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and (SRC / parts[1]).is_dir()) else module


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted: every cycle lies in one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_cycles_between_modules() -> None:
    edges, _ = import_graph()
    graph = {m: {t for t in ts if (m, t) not in EXPECTED_UNTIL_MERGED} for m, ts in edges.items()}
    remaining = cycles(graph)
    assert not remaining, f"import cycles (modules importing each other at import time): {remaining}"


def test_expected_until_merged_edges_still_exist() -> None:
    """Once the branch behind an entry is merged and its edge is gone, the entry must go too (the list shrinks)."""
    edges, _ = import_graph()
    modules = set(edges)
    stale = [e for e in EXPECTED_UNTIL_MERGED if e[0] in modules and e[1] not in edges[e[0]]]
    assert not stale, f"no longer imported, delete from EXPECTED_UNTIL_MERGED: {stale}"


def test_no_private_names_imported_across_packages() -> None:
    _, private = import_graph()
    across = sorted({(m, t, n) for m, t, n in private if package_of(m) != package_of(t)})
    assert not across, f"private names imported across packages (make them public or move them): {across}"


def test_the_checker_itself() -> None:
    """A deferred import and a `try:` one are edges, a TYPE_CHECKING one is not (its `else:` is)."""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a import b\nelse:\n    import h\n"
                     "try:\n    import e\nexcept ImportError:\n    import f\n"
                     "def g():\n    from .c import d\n")
    found = sorted(n.module if isinstance(n, ast.ImportFrom) else n.names[0].name for n in imports(tree))
    assert found == ["c", "e", "f", "h", "typing"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert package_of("phiforge.data.jsonl") == "phiforge.data" and package_of("phiforge.cli") == "phiforge.cli"


def test_the_package_root_holds_only_the_entry_points() -> None:
    """Everything else lives in a package named for its layer (README, "Architecture")."""
    root = sorted(p.name for p in SRC.glob("*.py"))
    assert root == ["__init__.py", "__main__.py", "cli.py", "errors.py", "info.py"], root
    recipes = sorted(p.name for p in (SRC / "recipes").iterdir() if p.is_dir())
    assert recipes == ["run", "studies", "train"] and not list((SRC / "recipes").glob("*.toml"))


if __name__ == "__main__":  # `python tests/test_layout.py`: the graph's cycles and private imports as they are
    edges, private = import_graph()
    print("cycles:", cycles(edges))
    print("private imports across packages:", sorted({p for p in private if package_of(p[0]) != package_of(p[1])}))
