"""The shape of the code base (issue 18, docs/architecture.md): no module in cdc/ over 800 lines,
no import cycle between cdc modules (imports inside functions and under TYPE_CHECKING count), and
no import inside a function without a comment saying why it is there.

Imports are read with ``ast`` (``.pyx``/``.pxi``: their ``import`` lines), resolved to the cdc
module they name (``from cdc.query import History`` is an edge to the package ``cdc.query``, whose
``__init__`` re-exports it; ``from cdc import names`` an edge to ``cdc.names``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cdc"
MAX_LINES = 800

#: Import cycles known, each as the set of modules of one strongly connected component. The test
#: fails on any other cycle, and when one of these is gone or has grown (then update this list).
#: None is left: issue 18 asks for none.
KNOWN_CYCLES: list[frozenset[str]] = []


def _sources() -> list[Path]:
    return sorted(p for ext in ("py", "pyx", "pxi") for p in PACKAGE.rglob(f"*.{ext}"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """Every cdc module by dotted name (a .pxi file is part of the .pyx that includes it)."""
    return {_module_name(p): p for p in _sources() if p.suffix != ".pxi"}


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


_PYX_FROM = re.compile(r"^[ \t]*from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]*)", re.MULTILINE)
_PYX_IMPORT = re.compile(r"^[ \t]*import[ \t]+([\w., \t]+)", re.MULTILINE)


def _imported(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(dotted name imported, line) for every import in ``path``, wherever it is: module
    level, functions, ``if TYPE_CHECKING:``. ``from m import a`` yields ``m.a``."""
    base = module if _is_package(path) else module.rpartition(".")[0]

    def absolute(level: int, name: str | None) -> str:
        if not level:
            return name or ""
        parts = base.split(".")
        parts = parts[: len(parts) - (level - 1)]
        return ".".join([*parts, *([name] if name else [])])

    if path.suffix == ".py":
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, node.lineno
            elif isinstance(node, ast.ImportFrom):
                origin = absolute(node.level, node.module)
                for alias in node.names:
                    yield f"{origin}.{alias.name}", node.lineno
        return
    texts = [path.read_text(encoding="utf-8")]
    if path.suffix == ".pyx":  # its .pxi files are textually included
        texts += [p.read_text(encoding="utf-8") for p in sorted(path.parent.glob(f"{path.stem}_*.pxi"))]
    for text in texts:
        for match in _PYX_FROM.finditer(text):
            level = len(match[1]) - len(match[1].lstrip("."))
            origin = absolute(level, match[1].lstrip(".") or None)
            line = text.count("\n", 0, match.start()) + 1
            for name in re.split(r"[\s,()]+", match[2]):
                if name and name != "as":
                    yield f"{origin}.{name}", line
        for match in _PYX_IMPORT.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            for name in match[1].split(","):
                yield name.split(" as ")[0].strip(), line


def import_graph() -> dict[str, dict[str, int]]:
    """cdc module -> {cdc module it imports: the line of the first such import}."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for name, line in _imported(module, path):
            if name != "cdc" and not name.startswith("cdc."):
                continue
            target = resolve(name)
            if target is not None and target != module:
                edges.setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def _describe(component: frozenset[str], graph: dict[str, dict[str, int]]) -> str:
    paths = _modules()
    edges = [
        f"  {a} -> {b} ({paths[a].relative_to(ROOT)}:{line})"
        for a in sorted(component)
        for b, line in sorted(graph[a].items())
        if b in component
    ]
    return "\n".join([", ".join(sorted(component)), *edges])


def test_no_module_over_800_lines() -> None:
    too_long = {
        str(p.relative_to(ROOT)): n
        for p in _sources()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"


def test_no_new_import_cycle() -> None:
    graph = import_graph()
    new = [c for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert not new, "import cycles between cdc modules (move what both need to a lower module):\n" + (
        "\n".join(_describe(c, graph) for c in new)
    )


def test_known_cycles_are_still_there() -> None:
    found = cycles(import_graph())
    gone = [sorted(known) for known in KNOWN_CYCLES if known not in found]
    assert not gone, f"known cycles gone or changed: {gone}: update KNOWN_CYCLES in {Path(__file__).name}"


def test_graph_sees_lazy_and_package_imports() -> None:
    """The reader itself: a function-level import, a relative import and a package re-export."""
    graph = import_graph()
    assert "cdc.history" in graph["cdc"]  # inside cdc.__getattr__
    assert "cdc.protocol.pgoutput" in graph["cdc.protocol"]  # the package's re-export
    assert "cdc.capture.model" in graph["cdc.capture._core"]  # a .pyx module
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [frozenset("abc")]


def _function_imports(path: Path) -> Iterator[tuple[int, int, str, str]]:
    """(first line, last line, text, the line above) of each import inside a function."""
    lines = path.read_text(encoding="utf-8").splitlines()

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[int, int, str, str]]:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                end = child.end_lineno or child.lineno
                yield (
                    child.lineno,
                    end,
                    "\n".join(lines[child.lineno - 1 : end]),
                    lines[child.lineno - 2].strip(),
                )
            yield from visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    yield from visit(ast.parse("\n".join(lines), str(path)), False)


def test_imports_inside_functions_say_why() -> None:
    """An import belongs at the top of its module; one inside a function (an optional or heavy
    dependency, the CLI's start-up time) carries a comment on its line or the line above, or
    follows another such import."""
    silent = []
    for path in _sources():
        if path.suffix != ".py":
            continue
        previous_end = 0  # the last line of the previous import that said why
        for line, end, text, above in _function_imports(path):
            ok = "#" in text or above.startswith("#") or previous_end == line - 1
            previous_end = end if ok else previous_end
            if not ok:
                silent.append(f"{path.relative_to(ROOT)}:{line}: {text.strip().splitlines()[0]}")
    assert not silent, "imports inside functions without a comment saying why:\n" + "\n".join(silent)
