"""The code's shape stays easy to follow: modules a reader can take in at once,
and imports that flow one way (images -> data -> model/engine -> predict ->
evaluate/train -> cli/service), with no module importing one that imports it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "imageorigin"
MAX_LINES = 510  # "about 500": a module past it is split by what a reader looks for


def _imports() -> dict[str, set[str]]:
    """Each module's package-relative imports, those inside functions included."""
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[name] = (deps & set(modules)) - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return path + [node, dep]
            if dep not in state and (found := visit(dep, path + [node])):
                return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_no_module_imports_one_that_imports_it():
    graph = _imports()
    assert len(graph) > 30 and "predict" in graph["cli"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"model": {"export"}, "export": {"model"}, "data": set()}) == ["export", "model", "export"]


def test_no_module_is_longer_than_a_reader_takes_in():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
