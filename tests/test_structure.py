"""The shape of the package: the import graph of ``danqing/`` has no circles, imports only point
down the layers of docs/architecture.md, and files and functions stay small.

The graph is read with ``ast`` from the source (nothing is imported): every ``import`` and
``from ... import`` anywhere in a file -- at the top, inside functions, under ``TYPE_CHECKING``
-- is an edge, relative imports are resolved, and ``from danqing.x import y`` is an edge to
``danqing.x.y`` when ``y`` is a module of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "danqing"

# Layers from the bottom up (docs/architecture.md, "Layers"): a module may import modules of its
# own layer or of a layer below, never one above. An entry is a module or package under
# ``danqing`` (dotted below it, e.g. "models.loader"; the most specific entry wins); "danqing"
# itself is the package's __init__, the public API.
LAYERS = (
    ("base", {"errors", "files", "cache", "pictures", "preprocess"}),
    ("models", {"models", "faces"}),
    ("engine", {"conditioning", "customise", "sampling", "decode", "request", "request_video", "outputs", "settings"}),
    ("passes", {"passes", "editing"}),
    ("studio", {"studio"}),
    ("workflows", {"apps", "training", "synthetic", "video", "threed"}),
    ("shells", {"server", "scale", "cli", "__main__", "danqing"}),
)
# The lower layers never import these, whatever the table above says (docs/architecture.md).
LOWER = ("models", "sampling", "conditioning", "outputs")
UPPER = ("editing", "studio", "server", "apps", "cli", "training")
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 120


def modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {imported danqing module: line of the first such import}, self-imports left out."""
    mods = modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in mods.items():
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package of this module, level - 1 steps up
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
            for target in targets:
                if target.split(".")[0] == "danqing" and target != name:
                    edges.setdefault(target, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[tuple[list[str], list[str]]]:
    """The strongly connected components with more than one module (Tarjan), each as (one
    closed path through it, ``a -> b -> ... -> a``; all its modules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[list[str], list[str]]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append((_path(graph, set(component)), sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of a component (breadth-first)."""
    start = min(component)
    parents = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if w in component and w not in parents:
                parents[w] = v
                queue.append(w)
    return sorted(component)


def top(module: str) -> str:
    """"danqing.models.loader" -> "models"; "danqing" -> "danqing"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(module: str) -> int | None:
    """The layer of the longest entry of ``LAYERS`` that names the module or a package above it
    ("files" would place one module apart from its package "outputs")."""
    parts = module.split(".")[1:] or ["danqing"]
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        for i, (_, names) in enumerate(LAYERS):
            if key in names:
                return i
    return None


def test_graph_reader_sees_every_kind_of_import(tmp_path):
    """The reader itself, on a made-up package: relative imports (also from a package
    ``__init__``), imports inside functions, ``from pkg import module`` and ``from pkg import
    name``; and a circle through them is found."""
    files = {
        "__init__.py": "def api():\n    from danqing import a\n",
        "a.py": "from . import b\nfrom .sub import c\n",
        "b.py": "import danqing.sub.c\nimport json\n",
        "sub/__init__.py": "from ..a import x\n",
        "sub/c.py": "from danqing.sub import name\n",
    }
    for rel, text in files.items():
        (tmp_path / "danqing" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "danqing" / rel).write_text(text)
    graph = {m: set(e) for m, e in import_graph(tmp_path / "danqing").items()}
    assert graph == {"danqing": {"danqing.a"}, "danqing.a": {"danqing.b", "danqing.sub.c"},
                     "danqing.b": {"danqing.sub.c"}, "danqing.sub": {"danqing.a"}, "danqing.sub.c": {"danqing.sub"}}
    [(path, members)] = cycles(import_graph(tmp_path / "danqing"))
    assert path == ["danqing.a", "danqing.sub.c", "danqing.sub", "danqing.a"]
    assert members == ["danqing.a", "danqing.b", "danqing.sub", "danqing.sub.c"]


def test_graph_of_danqing():
    graph = import_graph()
    assert "danqing.errors" in graph["danqing.models.registry"]
    assert "danqing.studio" in graph["danqing"]  # from danqing import studio, inside __getattr__


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles between modules:\n" + "\n".join(
        f"{' -> '.join(path)}   (the circle holds {len(members)}: {', '.join(members)})" for path, members in found)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in import_graph() if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add their package to LAYERS and docs/architecture.md): {unplaced}"


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """Every import of a module from a higher layer, as "module:line imports target (a -> b)"."""
    wrong = []
    for module, edges in sorted(graph.items()):
        mine = layer_of(module)
        for target, line in sorted(edges.items()):
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module}:{line} imports {target} ({LAYERS[mine][0]} -> {LAYERS[theirs][0]})")
    return wrong


def lower_importing_upper(graph: dict[str, dict[str, int]]) -> list[str]:
    """Imports of ``UPPER`` packages by modules of ``LOWER`` ones."""
    return [f"{m}:{line} imports {t}" for m, edges in sorted(graph.items()) if top(m) in LOWER
            for t, line in sorted(edges.items()) if top(t) in UPPER]


def test_layer_checks_catch_an_upward_import():
    graph = {"danqing.models.x": {"danqing.studio": 3, "danqing.errors": 4},
             "danqing.outputs.y": {"danqing.training.z": 7}, "danqing.studio": {"danqing.models.x": 1}}
    assert upward_imports(graph) == ["danqing.models.x:3 imports danqing.studio (models -> studio)",
                                     "danqing.outputs.y:7 imports danqing.training.z (engine -> workflows)"]
    assert lower_importing_upper(graph) == ["danqing.models.x:3 imports danqing.studio",
                                            "danqing.outputs.y:7 imports danqing.training.z"]
    assert [layer_of(m) for m in ("danqing", "danqing.cli", "danqing.models.x", "danqing.nowhere")] == [6, 6, 1, None]


def test_imports_point_down_the_layers():
    wrong = upward_imports(import_graph())
    assert not wrong, "imports pointing up a layer:\n" + "\n".join(wrong)


def test_lower_layers_never_import_editing_studio_or_shells():
    wrong = lower_importing_upper(import_graph())
    assert not wrong, "\n".join(wrong)


def test_files_and_functions_are_small():
    long_files, long_functions = [], []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT.parent).as_posix()
        n = len(text.splitlines())
        if n > MAX_FILE_LINES:
            long_files.append(f"{rel}: {n} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not long_files and not long_functions, (
        f"files over {MAX_FILE_LINES} lines: {long_files}; functions over {MAX_FUNCTION_LINES} lines: {long_functions}")
