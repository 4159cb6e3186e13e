"""The yuyan package's import graph: no cycles, no use of another module's private names, layers respected.

Every module under src/yuyan is parsed with `ast`; nothing is imported, so a cycle that would break at import
time is reported here rather than crashing the collection. Imports anywhere in a file count, at module level
or inside a function: an import moved into a function to dodge a cycle still ties the two modules together
both ways, which is what the dependency rule (docs/architecture.md) forbids. `from yuyan.a import b` where
`b` is a submodule is an import of `yuyan.a.b`; `from yuyan.a import X` for a name is an import of the
package `yuyan.a`. Importing `yuyan.a.b` also runs the `__init__` of every package on the way (`yuyan.a`),
except those that contain the importing module itself: a package's `__init__` importing its own submodules
is normal, but a submodule that takes a name back through its package's `__init__` closes a real cycle.
`importlib.import_module("yuyan.x")` counts, and an f-string `f"yuyan.cli.{name}"` counts as importing every
module under that prefix. Private names are those with one leading underscore (dunders are public);
`from yuyan.x import _f` and `m._f` after `import yuyan.x as m` count, inside the same module they do not.
Last, every import must point down (or across) the layers of docs/architecture.md, never up.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "yuyan"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    how: str  # the import as written, for the report


@dataclass(frozen=True)
class PrivateUse:
    module: str
    line: int
    name: str  # e.g. "yuyan.generate.engine._decode"


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package rooted at `root` (dotted name -> file), without importing any of them.

    pkgutil.walk_packages imports each package to find its children; iter_modules per folder does not."""
    modules = {package: root / "__init__.py"}
    for info in pkgutil.iter_modules([str(root)]):
        name = f"{package}.{info.name}"
        if info.ispkg:
            modules.update(package_modules(root / info.name, name))
        else:
            modules[name] = root / f"{info.name}.py"
    return modules


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by `from X import ...` (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class _ModuleScan(ast.NodeVisitor):
    """Collects one file's imports of the package's modules and its uses of their private names."""

    def __init__(self, module: str, modules: dict[str, Path]):
        self.module = module
        self.modules = modules
        self.is_package = modules[module].name == "__init__.py"
        self.edges: list[Edge] = []
        self.private: list[PrivateUse] = []
        self.aliases: dict[str, str] = {}  # local name bound to one of our modules -> that module

    def _edge(self, target: str, node: ast.AST, how: str) -> None:
        # importing `target` first runs the __init__ of every package above it, except our own packages,
        # which Python has already started before it runs this module
        own = set(_ancestors(self.module)) | ({self.module} if self.is_package else set())
        for name in [*_ancestors(target), target]:
            if name in self.modules and name != self.module and (name == target or name not in own):
                self.edges.append(Edge(self.module, name, node.lineno, how))

    def _ours(self, name: str) -> bool:
        return name == PACKAGE or name.startswith(PACKAGE + ".")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if self._ours(alias.name):
                self._edge(alias.name, node, f"import {alias.name}")
                if alias.asname:
                    self.aliases[alias.asname] = alias.name
                else:
                    self.aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = _resolve_from(self.module, self.is_package, node)
        if self._ours(source):
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                how = f"from {'.' * node.level}{node.module or ''} import {alias.name}"
                if sub in self.modules:  # a submodule, imported as a module
                    self._edge(sub, node, how)
                    self.aliases[alias.asname or alias.name] = sub
                    if _is_private(alias.name) and not self.module.startswith(source + "."):
                        self.private.append(PrivateUse(self.module, node.lineno, sub))
                else:
                    self._edge(source, node, how)
                    if _is_private(alias.name) and source != self.module:
                        self.private.append(PrivateUse(self.module, node.lineno, sub))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        named = isinstance(func, ast.Attribute) and func.attr == "import_module"
        if named and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and self._ours(arg.value):
                self._edge(arg.value, node, f'import_module("{arg.value}")')
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                prefix = str(arg.values[0].value)
                if self._ours(prefix):
                    for name in sorted(self.modules):
                        if name.startswith(prefix) and name != self.module:
                            self._edge(name, node, f'import_module(f"{prefix}{{...}}")')
        self.generic_visit(node)

    def _dotted_module(self, node: ast.expr) -> str | None:
        """The module an expression names (`m`, `yuyan.generate.engine`), if it is one of ours."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._dotted_module(node.value)
            if base is not None and f"{base}.{node.attr}" in self.modules:
                return f"{base}.{node.attr}"
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _is_private(node.attr):
            owner = self._dotted_module(node.value)
            if owner is not None and owner != self.module:
                self.private.append(PrivateUse(self.module, node.lineno, f"{owner}.{node.attr}"))
        self.generic_visit(node)


def scan(modules: dict[str, Path]) -> tuple[list[Edge], list[PrivateUse]]:
    """All import edges between the modules, and every use of another module's private name."""
    edges: list[Edge] = []
    private: list[PrivateUse] = []
    for name, path in sorted(modules.items()):
        visitor = _ModuleScan(name, modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges += visitor.edges
        private += visitor.private
    return edges, private


def components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of the graph (Tarjan's algorithm), each sorted, in a fixed order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] per strongly connected component that has one.

    A component holds every module that lies on some cycle with the others in it, so fixing the reported
    cycle may reveal another in the same component; each cycle is the shortest from the component's first
    module."""
    cycles = []
    for component in components(graph):
        start = component[0]
        if len(component) > 1 or start in graph.get(start, ()):
            cycles.append(_shortest_cycle(graph, start, set(component)))
    return sorted(cycles)


def _shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """Breadth-first from `start` back to itself, staying inside its component."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in within and w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is on no cycle")


def describe(cycle: list[str], edges: list[Edge]) -> str:
    """A cycle as one line per step: which file imports the next module, where and how."""
    first = {}
    for e in edges:
        first.setdefault((e.source, e.target), e)
    steps = [first[a, b] for a, b in zip(cycle[:-1], cycle[1:], strict=True)]
    return "\n".join(f"  {e.source}:{e.line} ({e.how}) -> {e.target}" for e in steps)


def _graph(edges: list[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    return graph


@pytest.fixture(scope="module")
def yuyan_scan() -> tuple[list[Edge], list[PrivateUse]]:
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without running its __init__
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    modules = package_modules(root, PACKAGE)
    assert {"yuyan.model.transformer", "yuyan.generate", "yuyan.cli"} <= modules.keys()
    return scan(modules)


def test_no_import_cycles(yuyan_scan):
    edges, _ = yuyan_scan
    graph = _graph(edges)
    cycles = find_cycles(graph)
    tangles = {c[0]: c for c in components(graph)}
    report = "\n\n".join(
        describe(c, edges) + f"\n  (all modules tied up with it: {', '.join(tangles[c[0]])})" for c in cycles
    )
    assert not cycles, f"{len(cycles)} import cycle(s) in yuyan:\n{report}"


# docs/architecture.md's dependency rule, bottom layer first: a module imports its own layer or lower ones
LAYERS = [
    ["yuyan.config", "yuyan.errors", "yuyan.fsutil", "yuyan.plots", "yuyan.progress"],
    ["yuyan.model", "yuyan.data", "yuyan.tokenizer"],
    ["yuyan.generate", "yuyan.train", "yuyan.evaluate", "yuyan.interpret"],
    ["yuyan.cli", "yuyan.serve", "yuyan.apps", "yuyan.__main__"],
    ["yuyan"],  # the public API re-exports from below; nothing inside imports it
]


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the longest package prefix that holds `module` (None when none does)."""
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            # a package holds its submodules, except the root, which holds only itself
            inside = module == p or (p != PACKAGE and module.startswith(p + "."))
            if inside and (best is None or len(p) > len(best[1])):
                best = (i, p)
    return None if best is None else best[0]


def test_dependencies_point_down_the_layers(yuyan_scan):
    edges, _ = yuyan_scan
    modules = {e.source for e in edges} | {e.target for e in edges}
    unplaced = sorted(m for m in modules if layer_of(m) is None)
    assert not unplaced, (
        f"modules in no layer of LAYERS (add them where docs/architecture.md puts them): {unplaced}"
    )
    upward = [e for e in edges if layer_of(e.target) > layer_of(e.source)]
    report = "\n".join(f"  {e.source}:{e.line} ({e.how}) -> {e.target}" for e in upward)
    assert not upward, f"imports that point up the layers of docs/architecture.md:\n{report}"


def test_no_private_names_of_other_modules(yuyan_scan):
    _, private = yuyan_scan
    report = "\n".join(f"  {p.module}:{p.line} uses {p.name}" for p in private)
    assert not private, f"modules use other modules' private names:\n{report}"


# The checker itself, on graphs and packages whose answers are known.


def test_find_cycles_on_a_synthetic_graph():
    graph = {
        "a": {"b"},
        "b": {"c", "d"},
        "c": {"a"},  # a -> b -> c -> a
        "d": {"e"},
        "e": set(),
        "f": {"f"},  # a module importing itself
        "g": {"h"},
        "h": {"g", "e"},  # g <-> h
    }
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["f", "f"], ["g", "h", "g"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    # two cycles through one node form one component; the shortest from its first node is reported
    assert find_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"a"}}) == [["a", "b", "a"]]


def _write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return package_modules(root / PACKAGE, PACKAGE)


def test_scan_finds_the_cycles_the_rules_describe(tmp_path):
    modules = _write_package(
        tmp_path,
        {
            "yuyan/__init__.py": "from yuyan.core import Thing\n",
            "yuyan/core.py": "from yuyan.errors import Oops\n",
            "yuyan/errors.py": "class Oops(Exception): ...\n",
            # a package importing its own submodules, which import siblings: no cycle
            "yuyan/gen/__init__.py": "from .engine import run\n",
            "yuyan/gen/engine.py": "from yuyan.gen import sampling\n",
            "yuyan/gen/sampling.py": "import yuyan.core\n",
            # relative, function-level imports both ways: a cycle
            "yuyan/gen/spec.py": "def f():\n    from . import draft\n",
            "yuyan/gen/draft.py": "from .spec import f\n",
            # a submodule taking a name back through the root package that imports it: a cycle
            "yuyan/core2.py": "import yuyan\n",
            # registration through the package __init__: a cycle
            "yuyan/cli/__init__.py": "import importlib\napp = 1\ndef reg(n):\n    importlib.import_module(f'yuyan.cli.{n}')\n",
            "yuyan/cli/data.py": "from yuyan.cli import app\n",
            # importing another module's private name, directly and as an attribute
            "yuyan/user.py": "from yuyan.gen.engine import _step\nimport yuyan.gen.sampling as s\ns._top_k(1)\ns.__name__\n",
        },
    )
    edges, private = scan(modules)
    assert find_cycles(_graph(edges)) == [
        ["yuyan.cli", "yuyan.cli.data", "yuyan.cli"],
        ["yuyan.gen.draft", "yuyan.gen.spec", "yuyan.gen.draft"],
    ]
    # core2 -> yuyan, but yuyan does not import core2: no cycle until it does
    (tmp_path / "yuyan/__init__.py").write_text("from yuyan.core import Thing\nfrom yuyan import core2\n")
    edges, _ = scan(modules)
    assert ["yuyan", "yuyan.core2", "yuyan"] in find_cycles(_graph(edges))
    assert sorted((p.module, p.name) for p in private) == [
        ("yuyan.user", "yuyan.gen.engine._step"),
        ("yuyan.user", "yuyan.gen.sampling._top_k"),
    ]


def test_layer_of_takes_the_longest_prefix():
    assert layer_of("yuyan") == 4
    assert layer_of("yuyan.generate.sampling") == 2
    assert layer_of("yuyan.cli.generate") == 3
    assert layer_of("yuyan.configs") is None  # a prefix must end at a dot
    assert layer_of("yuyan.newpackage.x") is None
