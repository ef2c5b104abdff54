"""The layering README states, read from the source: mcc_serve never imports mcc_train, export or torch; mcc_train
uses only mcc_serve's registry of choices; and no module imports itself back, however indirectly."""

import ast
from pathlib import Path

import pytest

from .conftest import REPO

PACKAGES = ("mcc_train", "export", "mcc_serve")
TORCH = ("torch", "torchvision", "timm", "safetensors.torch")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_imports() -> dict[str, set[str]]:
    """Every module of the three packages -> the modules it imports, anywhere in it (functions too)."""
    files = {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
                found.update(submodules or [base])
        graph[name] = found
    return graph


GRAPH = read_imports()


def imports_of(package: str) -> dict[str, set[str]]:
    return {m: deps for m, deps in GRAPH.items() if m == package or m.startswith(package + ".")}


def under(module: str, roots) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


def test_the_graph_is_read():
    assert "mcc_serve.runtime.choices" in GRAPH["mcc_serve.runtime.bundle"]
    assert "mcc_serve.runtime.service" in GRAPH["mcc_serve.routes.predict"]  # a relative import, two levels up
    assert "torch" in GRAPH["mcc_train.head"] and "mcc_train" in GRAPH["export.collapse"]


def test_mcc_serve_never_imports_training_export_or_torch():
    bad = {
        m: sorted(d for d in deps if under(d, ("mcc_train", "export", *TORCH)))
        for m, deps in imports_of("mcc_serve").items()
    }
    assert not {m: d for m, d in bad.items() if d}, "mcc_serve must stay torch-free and below the other packages"


def test_mcc_train_uses_only_the_registry_of_choices_from_the_other_packages():
    bad = {
        m: sorted(d for d in deps if under(d, ("export", "mcc_serve")) and d != "mcc_serve.runtime.choices")
        for m, deps in imports_of("mcc_train").items()
    }
    assert not {m: d for m, d in bad.items() if d}


def test_export_uses_only_the_runtime_of_mcc_serve():
    bad = {
        m: sorted(d for d in deps if under(d, ("mcc_serve",)) and not under(d, ("mcc_serve.runtime",)))
        for m, deps in imports_of("export").items()
    }
    assert not {m: d for m, d in bad.items() if d}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports, leaving out a module's import of its own package (the package is already loading)."""
    edges = {m: {d for d in deps if d in graph and not m.startswith(d + ".") and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (cycle := visit(d, [*path, d])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_no_module_imports_itself_back():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


@pytest.mark.parametrize(
    "graph, cycle", [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]), ({"p": {"p.x"}, "p.x": {"p"}}, None)]
)
def test_the_cycle_check_finds_a_cycle_and_allows_a_package_that_imports_its_modules(graph, cycle):
    assert find_cycle(graph) == cycle
