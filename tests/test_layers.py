"""The package's layers and the one-way arrows between them, checked on the source.

Every module under ``genie_kernels/`` is parsed (``ast``, nothing is imported), and every
import of a ``genie_kernels`` module is an edge: absolute or relative, at module level or
deferred inside a function.  Importing ``a.b.c`` also runs the package ``a.b``, so that is
an edge too, unless the importer lives inside it.  Two rules hold: the modules import each
other without a cycle, and no module imports from a layer above its own.

The layer order is written once, in :data:`LAYERS`; docs/design.md explains it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = "genie_kernels"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / ROOT

# Lowest first: a module may import from its own layer and from those before it.  Each
# entry names modules or packages (a package stands for everything inside it; the root
# package only for its __init__), and every module must fall into one of them.
LAYERS = (
    ("helpers", ("genie_kernels.checks", "genie_kernels.checkpoint", "genie_kernels.cost", "genie_kernels.metrics",
                 "genie_kernels.plotting")),
    ("ode", ("genie_kernels.ode",)),
    ("models", ("genie_kernels.models",)),
    ("heads", ("genie_kernels.heads",)),
    ("fast", ("genie_kernels.fast",)),
    ("sampling", ("genie_kernels.sampling", "genie_kernels.encoding")),
    ("integrations", ("genie_kernels.scheduler", "genie_kernels.k_diffusion")),
    ("export", ("genie_kernels.aot_export",)),
    ("zoo", ("genie_kernels.zoo",)),
    ("api", ("genie_kernels",)),
    ("cli", ("genie_kernels.cli", "genie_kernels.__main__")),
)

MAX_LINES = 400


def modules_of(package_dir: Path, root: str) -> dict[str, Path]:
    """``{dotted name: file}`` for every module of the package (a package by its __init__)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (root, *path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, modules: dict[str, Path], root: str) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name.split(".")[0] == root)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != root:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in modules else source)
    edges = set()
    for target in targets:
        assert target in modules, f"{name} imports {target}, which is not a module of {root}"
        edges.add(target)
        # importing a module runs the packages above it, unless the importer is inside them
        edges.update(p for p in _ancestors(target) if p in modules and p != name and p not in _ancestors(name))
    edges.discard(name)
    return edges


def import_graph(package_dir: Path, root: str) -> dict[str, set[str]]:
    modules = modules_of(package_dir, root)
    return {name: imports_of(name, path, modules, root) for name, path in modules.items()}


def layer_of(module: str, layers, root: str) -> int:
    """The index in ``layers`` of the most specific entry that holds ``module``."""
    best = None
    for index, (_, entries) in enumerate(layers):
        for entry in entries:
            if module == entry or (entry != root and module.startswith(entry + ".")):
                if best is None or len(entry) > best[0]:
                    best = (len(entry), index)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}"
    return best[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, …, a]``, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def upward_imports(graph: dict[str, set[str]], layers, root: str) -> list[str]:
    """Every edge from a lower layer to a higher one, as readable lines."""
    wrong = []
    for module, targets in sorted(graph.items()):
        own = layer_of(module, layers, root)
        for target in sorted(targets):
            other = layer_of(target, layers, root)
            if other > own:
                wrong.append(f"{module} ({layers[own][0]}) imports {target} ({layers[other][0]})")
    return wrong


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE_DIR, ROOT)


def test_every_module_belongs_to_a_layer(graph):
    assert len(graph) > 30
    for module in graph:
        layer_of(module, LAYERS, ROOT)


def test_the_modules_import_each_other_without_a_cycle(graph):
    assert find_cycle(graph) is None


def test_no_module_imports_from_a_higher_layer(graph):
    assert upward_imports(graph, LAYERS, ROOT) == []


def test_the_graph_sees_deferred_relative_and_package_imports(graph):
    assert "genie_kernels.fast.graph" in graph["genie_kernels.sampling"]  # deferred, inside sample()
    assert "genie_kernels.zoo.pretrained" in graph["genie_kernels.cli.sample"]  # deferred, two dots
    assert "genie_kernels.fast" in graph["genie_kernels.fast.graph"]  # `from . import triton_status`
    assert "genie_kernels.heads" in graph["genie_kernels.fast.sampler"]  # runs heads/__init__.py first


def test_no_module_is_longer_than_about_400_lines():
    long = {name: n for name, path in modules_of(PACKAGE_DIR, ROOT).items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_check_finds_a_cycle_and_an_upward_import(tmp_path):
    """The rules fail where they should: on a package whose low module imports, inside a
    function, from the high one that imports it."""
    package = tmp_path / "pkg"
    (package / "low").mkdir(parents=True)
    (package / "__init__.py").write_text("from .high import shout\n")
    (package / "low" / "__init__.py").write_text("")
    (package / "low" / "words.py").write_text("def word():\n    from ..high import shout\n    return 'a'\n")
    (package / "high.py").write_text("import pkg.low.words\n\n\ndef shout():\n    return pkg.low.words.word()\n")
    layers = (("low", ("pkg.low",)), ("high", ("pkg.high",)), ("api", ("pkg",)))
    graph = import_graph(package, "pkg")
    assert graph["pkg.high"] == {"pkg.low", "pkg.low.words"}
    assert find_cycle(graph) == ["pkg.high", "pkg.low.words", "pkg.high"]
    assert upward_imports(graph, layers, "pkg") == ["pkg.low.words (low) imports pkg.high (high)"]
    with pytest.raises(AssertionError, match="belongs to no layer"):
        layer_of("pkg.elsewhere", layers, "pkg")
